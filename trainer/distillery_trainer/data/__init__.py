"""The collected data's formats: answer shards (JSONL) and the teacher's top-k logprob files.

Pure Python and numpy: importing this package imports no torch, so the collection stage can use the writer.
"""
