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
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Weights per quantization scale: 32 is the most faithful (as Q4_0); 128 decodes and prefills "
                   "10-20% faster on CPUs and loses more quality (the manifest's quality figures say how much).")
@click.option("--graph", type=click.Choice(["auto", "optimum", "fused"]), default="auto", show_default=True,
              help="fused: ONNX Runtime GenAI's fused decoder graph (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/3, "
                   "Granite, SmolLM3 at fp32, fp16 or int4), about twice as fast to serve on CPUs; optimum: the "
                   "general graph, any architecture; auto: fused where it can be.")
@click.option("--prefill-graph", type=click.Choice(["auto", "int8", "none"]), default="auto", show_default=True,
              help="With --graph fused --quantize int4: a second graph that reads prompts with int8 weights and "
                   "activations, about twice as fast on CPUs, for as much memory again as the int4 weights; auto: "
                   "where that stays under 4 GB.")
@click.option("--name", help="The id clients will send as `model` (default: the hub id, or the file or folder name).")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repo's own Python code.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against PyTorch.")
@click.option("--max-memory", type=float, metavar="GB",
              help="Refuse, before loading any weights, an export estimated to need more memory than this "
                   "(default: the memory available now).")
@_friendly_errors
def export(source: str, output: Path | None, models_dir: Path, revision: str | None, task: str, dtype: str,
           quantize: str, block_size: str, graph: str, prefill_graph: str, name: str | None, trust_remote_code: bool,
           force: bool, no_validate: bool, max_memory: float | None) -> None:
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
        task=task, dtype=dtype, quantize=quantize, block_size=int(block_size), trust_remote_code=trust_remote_code,
        force=force, validate=not no_validate, graph=graph, name=name, max_memory_gb=max_memory,
        prefill_graph=prefill_graph,
    ))
    click.echo(str(folder))


@main.command("models")
@click.option("--models-dir", type=click.Path(path_type=Path), default=Path("models"), show_default=True)
@_friendly_errors
def list_models(models_dir: Path) -> None:
    """List the exported models in models/ (name, task, graph, dtype, quantization, size)."""
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
        rows.append((folder.name, m.name, m.task, m.graph if m.is_generative else "-", m.dtype, m.quantization,
                     f"{size / 1e6:.1f} MB"))
    if not rows:
        click.echo(f"no exported models in {models_dir}/ (run `fastllm export MODEL`)")
        return
    header = ("FOLDER", "MODEL ID", "TASK", "GRAPH", "DTYPE", "QUANT", "SIZE")
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


@main.command("bench")
@click.argument("base_url", required=False)
@click.option("--model", help="Model id to request (default: the first of BASE_URL/models).")
@click.option("--label", help="Name of this server in the table and plot (default: the model id).")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer key, if the server wants one.")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True,
              help="Comma-separated client counts (batch sizes with --embeddings).")
@click.option("--requests", "requests_per_client", type=int, default=2, show_default=True,
              help="Requests per client at each level and round (at least 4 per round; always 8 with "
                   "--embeddings).")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Generated tokens per request.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Rounds per level; rates are their median.")
@click.option("--max-seconds", type=float, default=300.0, show_default=True,
              help="Per round: stop issuing requests after this long.")
@click.option("--ban-tokens", default="", metavar="IDS",
              help="Comma-separated token ids (the model's end-of-turn ids) to forbid with logit_bias, so that "
                   "servers without ignore_eos also generate --max-tokens tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="Sampling temperature of the requests (0: greedy; OpenAI's clients default to 1).")
@click.option("--embeddings", is_flag=True, help="Measure /v1/embeddings inputs/s at each batch size instead.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report (all runs) here.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), help="Write the tables here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Write a PNG plot here (needs matplotlib: pip install \"fastllm[bench]\").")
@click.option("--merge", "merge_paths", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Earlier JSON reports to put beside this run (repeatable); without BASE_URL, only merge.")
@_friendly_errors
def bench_command(base_url: str | None, model: str | None, label: str | None, api_key: str | None,
                  concurrency: str, requests_per_client: int, max_tokens: int, repeat: int, max_seconds: float,
                  ban_tokens: str, temperature: float, embeddings: bool, json_path: Path | None,
                  markdown_path: Path | None, plot_path: Path | None, merge_paths: tuple[Path, ...]) -> None:
    """Load an OpenAI-compatible server at BASE_URL (e.g. http://127.0.0.1:3000/v1) and report.

    Streams chat completions at each concurrency level and reports time to first token, inter-token
    latency, end-to-end latency, requests/s, generated tokens/s and errors. Works against any server
    that speaks the OpenAI API, so peers are measured with the same load.
    """
    _setup_logging("warning")
    from fastllm.bench.load import Target
    from fastllm.bench.report import Report, markdown, plot, read_report, write_json
    from fastllm.bench.runner import discover_model, sweep
    from fastllm.bench.summary import LevelSummary
    from fastllm.errors import BenchError

    try:
        levels = [int(v) for v in concurrency.split(",")]
    except ValueError as exc:
        raise click.BadParameter("comma-separated integers, e.g. 1,2,4,8,16", param_hint="--concurrency") from exc
    try:
        banned = [int(v) for v in ban_tokens.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter("comma-separated token ids, e.g. 0,2", param_hint="--ban-tokens") from exc
    if any(v < 1 for v in levels) or repeat < 1 or requests_per_client < 1 or max_tokens < 1:
        raise click.BadParameter("levels, --repeat, --requests and --max-tokens must be positive")
    if temperature < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--temperature")
    runs = [run for path in merge_paths for run in read_report(path).runs]
    if base_url:
        base_url = base_url.rstrip("/")
        target = Target(base_url=base_url, model=model or "", api_key=api_key, max_tokens=max_tokens,
                        ban_token_ids=banned, temperature=temperature)
        target.model = target.model or discover_model(target)

        def show(s: LevelSummary) -> None:
            if embeddings:
                click.echo(f"batch {s.concurrency:>3}: {s.tok_s:8.1f} inputs/s  e2e p50 {s.e2e_p50_ms} ms  "
                           f"errors {s.errors}/{s.requests}")
            else:
                click.echo(f"{s.concurrency:>3} clients: {s.tok_s:8.1f} tok/s  {s.req_s:6.2f} req/s  "
                           f"TTFT p50 {s.ttft_p50_ms} ms  ITL p50 {s.itl_p50_ms} ms  errors {s.errors}/{s.requests}")

        runs.append(sweep(target, levels, label=label or target.model, repeat=repeat, max_seconds=max_seconds,
                          requests=lambda level: 8 if embeddings else max(4, requests_per_client * level),
                          embeddings=embeddings, progress=show))
    elif not runs:
        raise BenchError("give a BASE_URL to measure, or --merge reports to put together")
    report = Report.new(runs)
    if json_path:
        write_json(report, json_path)
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(report))
    if plot_path:
        plot(report, plot_path)
    if not base_url or not (json_path or markdown_path or plot_path):
        click.echo(markdown(report))


if __name__ == "__main__":
    main()
