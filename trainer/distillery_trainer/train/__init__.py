"""Stage 2, ``distillery-trainer train``: the student trained on the collected teacher outputs.

- :mod:`.losses` — the per-token KD/CE loss, chunked and fused with the LM head (dense and top-k teachers);
- :mod:`.examples`, :mod:`.batching` — chat template and masks; the deterministic, resumable batch plan;
- :mod:`.loop` — one run on every rank (DDP or FSDP), with :mod:`.checkpoint`, :mod:`.progress`,
  :mod:`.guards` and :mod:`.schedule`; :mod:`.modeling` for models, LoRA and saving; :mod:`.dpo` after it;
- :mod:`.command` — the CLI registration (argparse only: importing it imports no torch).
"""
