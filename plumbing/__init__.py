"""What keeps a run alive, off the method's reading path: small boring modules that import no stage.

    ranks      process groups (torchrun or a world of one), rank-0 printing, collectives, stop signals
    flags      command-line flags from a config dataclass, and the checks of their values
    files      DataError, JSON written atomically, JSONL read with line numbers, the --out_dir lock
    runs       a training stage's --out_dir: checks before loading, the step log, stop and save
    fsdp       FSDP2 loading and sharding, resumable checkpoints, the Hugging Face export
    memory     the memory plan of a run, from config.json alone
    batching   right-padded tensors, micro-batches, PAD items, ranks balanced by tokens (Algorithm 2)
    concat     the concat layout (Appendix A.5): one row per question under a tree mask
    datafiles  training data files (canonical, s1K-1.1, sampled) and the pool-to-mixed recipe
    evalfiles  evaluation problems and their prompts, rows files, the authors' protocol
    votes      score.py's Cons@k vote over many subsets of responses at once (numpy)
    score_report score.py's means over problems, per-fork summary, metrics file and printed table
    decoding   shared-prefix decoding with forced forking tags (infer.py and gfpo.py)
    grader     reading a response's answer and judging it against the gold (math-verify)
    matchstats the configuration counts of Appendix A.2 (matching.json)
    figures    the PNGs select_token.py and gfpo.py draw
    select_report select_token.py's matching.json checks, its printed table and its figures
"""
