"""The collected data's formats: answer shards (JSONL, ``shards.py``) and the teacher's top-k logprob files
(``topk.py``: the one writer collection uses and the one reader training uses).

Pure Python and numpy: importing this package imports no torch.
"""
