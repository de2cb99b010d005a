"""The `fastllm` command. Heavy imports happen inside commands, so `--help` is instant everywhere.

The seed's invocations still work: `fastllm --model X` and `fastllm --config file` start the server
exactly as `fastllm serve` does.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fastllm.errors import FastLLMError

log = logging.getLogger("fastllm")


def _setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Our own errors become one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FastLLMError as exc:
            click.secho(f"error: {exc.message}", err=True, fg="red")
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _serve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="TOML or JSON config file (default: ./config.toml or ./config.json if present)."),
        click.option("--model", "models", multiple=True,
                     help="Model to serve: a folder in models/, a path, or a hub repo of ONNX files. Repeat to "
                          "serve several."),
        click.option("--served-model-name", help="The id clients send as `model` (first model only)."),
        click.option("--host", help="Address to bind (default 127.0.0.1)."),
        click.option("--port", type=int, help="Port to bind (default 3000)."),
        click.option("--models-dir", type=click.Path(path_type=Path), help="Where exports live (default models/)."),
        click.option("--providers", help="Comma-separated ONNX Runtime providers, or 'auto'."),
        click.option("--threads", type=int, help="Intra-op threads per model (default: physical cores)."),
        click.option("--max-batch-size", type=int, help="Sequences decoded together per step."),
        click.option("--api-key", "api_keys", multiple=True, help="Require this Bearer key; repeatable."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"])),
        click.option("--ray", "ray_replicas", type=int, metavar="REPLICAS",
                     help="Serve REPLICAS copies on Ray Serve (pip install \"fastllm[ray]\") instead of one process."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _serve(config_file: Path | None, models: tuple[str, ...], served_model_name: str | None, host: str | None,
           port: int | None, models_dir: Path | None, providers: str | None, threads: int | None,
           max_batch_size: int | None, api_keys: tuple[str, ...], log_level: str | None,
           ray_replicas: int | None = None) -> None:
    from fastllm.config import load_settings

    overrides: dict[str, Any] = {
        "server": {"host": host, "port": port, "api_keys": list(api_keys) or None, "log_level": log_level},
        "runtime": {
            "providers": (providers if providers == "auto" else providers.split(",")) if providers else None,
            "threads": threads,
            "max_batch_size": max_batch_size,
        },
        "models_dir": models_dir,
    }
    if models:
        overrides["model"] = {"model_id": models[0], "served_model_name": served_model_name}
        overrides["models"] = list(models[1:]) or None
    elif served_model_name:
        overrides["model"] = {"served_model_name": served_model_name}
    settings = load_settings(config_file, overrides)
    _setup_logging(settings.server.log_level)
    if ray_replicas:
        from fastllm import ray_serve

        ray_serve.run(settings, replicas=ray_replicas)
        return
    from fastllm.server.run import run_server

    run_server(settings)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_serve_options
@click.version_option(package_name="fastllm")
@click.pass_context
@_friendly_errors
def main(ctx: click.Context, **kwargs: Any) -> None:
    """FastLLM: export HuggingFace models to ONNX once, serve them fast behind an OpenAI-compatible API.

    Without a command, starts the server (same as `fastllm serve`).
    """
    if ctx.invoked_subcommand is None:
        _serve(**kwargs)
    elif any(value not in (None, ()) for value in kwargs.values()):
        raise click.UsageError(f"server options go after the command: fastllm {ctx.invoked_subcommand} --option ...")


@main.command()
@_serve_options
@_friendly_errors
def serve(**kwargs: Any) -> None:
    """Serve exported models with ONNX Runtime on an OpenAI-compatible HTTP API.

    Precedence: these flags, then FASTLLM_SECTION__KEY environment variables, then the config file.
    """
    _serve(**kwargs)


@main.command()
@click.argument("source")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Output folder (default models/<name>).")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True,
              help="Where the default output folder goes.")
@click.option("--revision", help="Hub branch, tag or commit.")
@click.option("--task", type=click.Choice(["auto", "text-generation", "embedding"]), default="auto",
              show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16 is for GPUs; on CPUs prefer --quantize int4.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
              help="ONNX Runtime weight-only quantization (MatMulNBits).")
@click.option("--graph", type=click.Choice(["optimum", "fused"]), default="optimum", show_default=True,
              help="fused: ONNX Runtime GenAI's fused decoder graph (Llama, Mistral, Qwen2, Phi-3, Gemma), "
                   "several times faster per token on CPUs.")
@click.option("--name", help="The id clients will send as `model` (default: the hub id, or the file or folder name).")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's own Python code.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against PyTorch.")
@_friendly_errors
def export(source: str, output: Path | None, models_dir: Path, revision: str | None, task: str, dtype: str,
           quantize: str, graph: str, name: str | None, trust_remote_code: bool, force: bool,
           no_validate: bool) -> None:
    """Export SOURCE (a hub id, a local HF folder or a .gguf file) to ONNX with a KV cache.

    The result goes to models/<name>/ with tokenizer, configs and a fastllm.json manifest. The hub
    token is read from HF_TOKEN; HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
    """
    _setup_logging()
    import importlib.util

    from fastllm.errors import MissingExtraError

    # Fail early with the install hint, but without importing torch (seconds) before the cheap
    # checks (dtype, source, output folder) have had their say.
    for module in ("optimum", "torch", "transformers", "onnx", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("export", module)
    from fastllm.export.pipeline import ExportOptions
    from fastllm.export.pipeline import export as run_export

    folder = run_export(ExportOptions(
        source=source, output=output, models_dir=models_dir, revision=revision, token=os.environ.get("HF_TOKEN"),
        task=task, dtype=dtype, quantize=quantize, trust_remote_code=trust_remote_code, force=force,
        validate=not no_validate, graph=graph, name=name,
    ))
    click.echo(str(folder))


@main.command("models")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True)
@_friendly_errors
def list_models(models_dir: Path) -> None:
    """List the exported models in models/ (name, task, dtype, quantization, size)."""
    from fastllm.errors import CorruptModelError
    from fastllm.manifest import is_model_dir, read_manifest

    rows = []
    # Hidden folders are exports in progress (or killed mid-way): never list them as models.
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []:
        if folder.name.startswith(".") or not is_model_dir(folder):
            continue
        try:
            m = read_manifest(folder)
        except CorruptModelError as exc:
            click.secho(f"warning: skipping {folder.name}: {exc.message}", err=True, fg="yellow")
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        rows.append((folder.name, m.name, m.task, m.dtype, m.quantization, f"{size / 1e6:.1f} MB"))
    if not rows:
        click.echo(f"no exported models in {models_dir}/ (run `fastllm export MODEL`)")
        return
    header = ("FOLDER", "MODEL ID", "TASK", "DTYPE", "QUANT", "SIZE")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@main.command("bundle")
@click.argument("model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Folder to write the context to.")
@click.option("--gpu", is_flag=True, help="CUDA base image and onnxruntime-gpu instead of the CPU build.")
@click.option("--image", help="Image name for the Kubernetes manifests (default fastllm-<model>:latest).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@_friendly_errors
def bundle_command(model_dir: Path, output: Path, gpu: bool, image: str | None, force: bool) -> None:
    """Write a Docker build context (and Kubernetes manifests) that serves MODEL_DIR.

    The image holds fastllm[serve] and the model, runs as a non-root user and checks /health. Build and
    run it with: docker build -t NAME OUTPUT && docker run -p 3000:3000 NAME
    """
    from fastllm.bundle import bundle

    result = bundle(model_dir, output, gpu=gpu, force=force, image=image)
    click.echo(f"wrote {result.output} (model {result.model_bytes / 1e6:.1f} MB); "
               f"build it with: docker build -t {result.image} {result.output}")


if __name__ == "__main__":
    main()
