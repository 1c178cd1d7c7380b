"""The matching statistics of a run (Appendix A.2 and A.3.3, Figures 7 and 10), kept by train.py in
<out_dir>/matching.json and in every checkpoint: per epoch, how often each optimal configuration
occurred, the edge counts, and the summed matching gap. select_token.py reads them (Eq. 6). Also the
matching gap of Figure 10.
"""
import math
from collections import Counter

import numpy as np


class MatchingStats:
    """Per epoch: how often each optimal configuration occurred, the edge counts, and the mean gap
    (Appendix A.2). A configuration is the set of (fork, key) edges of one question, where key is
    the trace's source when known (so configurations compare across questions), else its index."""

    def __init__(self, matching, fork_names, fork_style="special", epochs=None):
        self.matching, self.fork_names, self.fork_style = matching, fork_names, fork_style
        self.epochs = epochs or []

    def update(self, epoch, forks, traces, sources, gap):
        """Counts one question's optimal matching of `epoch`."""
        e = self._epoch(epoch)
        keys = [sources[j] if sources else int(j) for j in traces]
        e["configurations"][tuple(sorted(zip(map(int, forks), keys), key=str))] += 1
        for f, j, key in zip(forks, traces, keys):
            e["edges"][(int(f), int(j), key if sources else None)] += 1
        e["questions"] += 1
        e["gap_sum"] += gap or 0.0

    def end_step(self, epoch):
        self._epoch(epoch)["steps"] += 1

    def _epoch(self, epoch):
        while len(self.epochs) <= epoch:
            self.epochs.append({"epoch": len(self.epochs), "steps": 0, "questions": 0,
                                "gap_sum": 0.0, "configurations": Counter(), "edges": Counter()})
        return self.epochs[epoch]

    def to_json(self):
        epochs = []
        for e in self.epochs:
            configs = [{"edges": [list(edge) for edge in c], "count": n}
                       for c, n in e["configurations"].most_common()]
            edges = [{"fork": f, "trace": j, "source": s, "count": n} for (f, j, s), n in
                     sorted(e["edges"].items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2])))]
            mean_gap = e["gap_sum"] / max(e["questions"], 1)  # sft computes no costs: undefined
            epochs.append({"epoch": e["epoch"], "steps": e["steps"], "questions": e["questions"],
                           "mean_gap": None if self.matching == "sft" else mean_gap,
                           "gap_sum": e["gap_sum"], "configurations": configs, "edges": edges})
        return {"matching": self.matching, "num_forks": len(self.fork_names),
                "fork_tokens": self.fork_names, "fork_style": self.fork_style, "epochs": epochs}

    @classmethod
    def from_json(cls, obj):
        epochs = []
        for e in obj["epochs"]:
            configs = Counter({tuple(tuple(edge) for edge in c["edges"]): c["count"]
                               for c in e["configurations"]})
            edges = Counter({(d["fork"], d["trace"], d["source"]): d["count"] for d in e["edges"]})
            epochs.append({"epoch": e["epoch"], "steps": e["steps"], "questions": e["questions"],
                           "gap_sum": e["gap_sum"], "configurations": configs, "edges": edges})
        return cls(obj["matching"], obj["fork_tokens"], obj.get("fork_style", "special"), epochs)


def matching_gap(cost, forks, traces):
    """Mean cost per matched pair of all the other injective matchings minus the optimal one's
    (Appendix A.3.3, Figure 10); cost: [N, M], (forks, traces) the optimal matching. Exact without
    enumeration: under a uniform injective matching each trace's token is uniform over the tokens
    (or each token's trace over the traces, if M > N), so the mean over all A matchings is E = sum
    of column (row) means, and the mean over the others is E + (E - optimal) / (A - 1)."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    optimal = cost[forks, traces].sum()
    expected = cost.mean(0).sum() if n >= m else cost.mean(1).sum()
    count = math.perm(max(n, m), min(n, m))
    if count == 1:
        return 0.0
    return float((expected - optimal) * count / (count - 1) / min(n, m))
