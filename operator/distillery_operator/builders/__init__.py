"""Pure builders: a run (and the operator's settings) in, a child manifest (a plain dict) out.

One module per kind of child: :mod:`.config` (the stage config), :mod:`.collect` (the collection Job
and a self-hosted teacher), :mod:`.train` (PyTorchJob, or an Indexed Job and headless Service),
:mod:`.serve` (the student's vLLM Deployment and Service), :mod:`.evaluate` (the evaluation Job).
"""
