"""``distillery-trainer serve``: vLLM's OpenAI-compatible server for a model, in the foreground.

The same arguments as the operator's Deployment (one builder, :mod:`.args`); the build (CPU or GPU) is
the one installed. ``--model`` takes a Hugging Face directory, a ``.gguf`` file or ``pkg://...`` (those
two are converted once and cached). With ``--config``, the model is the run's trained ``student/`` and
the settings are ``spec.serving``'s. Ctrl-C or SIGTERM stops vLLM cleanly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI-compatible server (GPU or CPU build, as installed)",
        description=(
            "Start vLLM's OpenAI-compatible server with the arguments the operator's Deployment uses, "
            "wait for /health, print the base URL, and stop it cleanly on Ctrl-C or SIGTERM. "
            "Extra vLLM arguments go after `--`."
        ),
    )
    p.add_argument("--model", help="Hugging Face model directory, .gguf file or pkg://<package>/<file>")
    p.add_argument(
        "--config", metavar="FILE", help="a run's stage config: serve its student/ with spec.serving"
    )
    p.add_argument("--name", help="served model name (default: the directory's name, or the run's name)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--dtype", default=None, help="vLLM --dtype (default auto)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length vLLM allocates for")
    p.add_argument(
        "--max-logprobs", type=int, default=None, help="largest top_logprobs a request may ask (default 20)"
    )
    p.add_argument("--tensor-parallel-size", type=int, default=None, help="GPUs to shard over (GPU build)")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=None, help="share of GPU memory (GPU build)"
    )
    p.add_argument("--kv-cache-gib", type=int, default=1, help="KV-cache size in GiB (CPU build; default 1)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="which vLLM build (default: the installed one)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where converted .gguf models are cached (default ~/.cache/distillery/models)",
    )
    p.add_argument(
        "--startup-timeout", type=float, default=900.0, help="seconds to wait for /health (default 900)"
    )
    p.add_argument("--log", metavar="FILE", default=None, help="also write vLLM's output to FILE")
    p.add_argument("--quiet", action="store_true", help="do not copy vLLM's output to stderr")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, start nothing")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG", help="extra vLLM arguments, after --")
    p.set_defaults(func=_run)


def _fail(msg: str, code: int = 2) -> NoReturn:
    print(f"serve: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _server(args: argparse.Namespace) -> tuple[Any, str]:
    """The VllmServer to run, and a one-line description."""
    from ..models import ModelNotFound, materialize
    from .args import VllmServer

    gpu = args.device == "gpu"
    if args.config:
        from ..api import SpecError, load_stage_config
        from ..layout import RunLayout

        try:
            config = load_stage_config(args.config)
        except (OSError, SpecError) as exc:
            _fail(f"cannot read the stage config: {exc}")
        model = args.model or str(RunLayout(Path(config.artifacts)).student_dir)
        base = VllmServer.for_student(config.spec.serving, model, args.name or config.run.name, gpu=gpu)
    else:
        if not args.model:
            _fail("give --model DIR (or --config FILE to serve a run's student)")
        base = VllmServer(model=args.model, served_model_name=args.name or "", enforce_eager=not gpu)
    cache = Path(args.cache_dir or Path.home() / ".cache" / "distillery" / "models")
    try:
        model_dir = materialize(base.model, cache)
    except ModelNotFound as exc:
        _fail(str(exc))
    looks_local = (
        model_dir.startswith(("/", ".", "~")) or model_dir.endswith(".gguf") or os.path.exists(model_dir)
    )
    if looks_local and not os.path.isfile(os.path.join(model_dir, "config.json")):
        what = "the run's trained student (run the train stage first)" if args.config else "a model directory"
        _fail(
            f"{model_dir}: no config.json here: --model must be {what}, a .gguf file or pkg://<package>/<file>"
        )
    name = base.served_model_name or Path(base.model.rstrip("/")).name.removesuffix(".gguf")
    overrides: dict[str, Any] = {
        "model": model_dir,
        "served_model_name": name,
        "host": args.host,
        "port": args.port,
    }
    for attr in ("dtype", "max_model_len", "max_logprobs", "tensor_parallel_size", "gpu_memory_utilization"):
        if getattr(args, attr) is not None:
            overrides[attr] = getattr(args, attr)
    overrides["extra_args"] = tuple(base.extra_args) + tuple(args.vllm_args)
    import dataclasses

    return dataclasses.replace(base, **overrides), f"{name} ({model_dir})"


def _raise_interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from .launcher import VllmLauncher, VllmNotInstalled, VllmStartError

    server, what = _server(args)
    try:
        launcher = VllmLauncher(
            server,
            build=None if args.device == "auto" else args.device,
            kv_cache_gib=args.kv_cache_gib,
            log_path=Path(args.log) if args.log else None,
            echo=not args.quiet,
            startup_timeout=args.startup_timeout,
            progress=True,
        )
    except VllmNotInstalled as exc:
        _fail(str(exc))
    if args.dry_run:
        base_env = os.environ
        added = {k: v for k, v in launcher.env().items() if base_env.get(k) != v}
        print(
            " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(added.items())), shlex.join(launcher.argv())
        )
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a pod's stop, like Ctrl-C: stop vLLM cleanly
    print(f"serve: starting vLLM ({launcher.build} build) for {what}", file=sys.stderr, flush=True)
    try:
        launcher.start()
        print(f"serve: {server.served_model_name} ready at {launcher.base_url} (Ctrl-C stops it)", flush=True)
        assert launcher.proc is not None
        rc = launcher.proc.wait()
        print(f"serve: vLLM exited by itself with code {rc}\n{launcher.tail()}", file=sys.stderr)
        return rc or 1
    except VllmStartError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("serve: stopping vLLM", file=sys.stderr, flush=True)
        return 0
    finally:
        launcher.stop()
