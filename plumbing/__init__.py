"""What keeps a run alive, off the method's reading path: small boring modules that import no stage.

Every stage
    ranks          process groups (torchrun or a world of one), rank-0 printing, collectives
    flags          command-line flags from a config dataclass, and the checks of their values
    files          DataError, atomic JSON, JSONL with line numbers, the lock, the tokenizer
    runs           a training stage's run and --out_dir: checks, the step log, stop and save
    fsdp           FSDP2 loading and sharding, resumable checkpoints, the Hugging Face export
    memory         the memory plan of a run, from config.json alone
    memory_report  --plan's table and exit code, the refusal on CUDA, train.py's planned step
    simulate       the step's memory measured on fake tensors on the CPU (--plan --simulate)
train.py and match.py
    batching       right-padded tensors, micro-batches, PAD items, ranks balanced by tokens (Alg. 2)
    concat         the concat layout (Appendix A.5): one row per question under a tree mask
    datafiles      training data files (canonical, s1K-1.1, sampled) and the pool-to-mixed recipe
    matchstats     the configuration counts of Appendix A.2 (matching.json), the matching gap
    trainrun       train.py's resume (model, AdamW, statistics), its start and step lines
infer.py, score.py and select_token.py
    evalfiles      evaluation problems and their prompts, rows files, the authors' protocol
    inferrun       infer.py's output path, tag style, start lines and rank-strided loop
    decoding       shared-prefix decoding with forced forking tags (infer.py and gfpo.py)
    grader         a response's answer judged against the gold (math-verify; answers, values)
    votes          score.py's expected Cons@k over many subsets of responses at once (numpy)
    score_report   score.py's means over problems, per-fork summary, metrics file, printed table
    select_report  select_token.py's matching.json checks, its printed table and its figures
    figures        the PNGs select_token.py and gfpo.py draw
gfpo.py
    gfporun        the checks before loading, the model and pi_start, step seeds, records and lines
    gfpodecoding   the rollout memory plan, weights gathered for decoding, responses graded
"""
