"""The soak of scripts/soak.py at a small size: mixed chat, streams, embeddings, clients that hang up and
clients that send bad input, 16 at a time, against a server of its own so /metrics counts are exact.

It passes only with no 5xx, every answer equal to its solo greedy reference, /metrics agreeing with what
the clients saw, nothing queued or running afterwards, and resident memory within 5% of its level after
a warm-up round. Run it larger by hand: `python scripts/soak.py --url URL --requests 500`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

from serving import chat_and_embedding_config, run_server

ROOT = Path(__file__).resolve().parent.parent


def _load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def test_soak_mixed_load_stays_correct_and_leaves_nothing_behind(smollm2_fp32: Path, minilm_export: Path,
                                                                   tmp_path: Path) -> None:
    config = chat_and_embedding_config(tmp_path, smollm2_fp32, minilm_export)
    with run_server(["--config", str(config)], log_dir=tmp_path) as running:
        report = asyncio.run(soak.run_soak(soak.SoakConfig(
            url=running.url, requests=120, concurrency=16, max_tokens=8, pid=running.process.pid,
        )))
        control = asyncio.run(_with_wrong_references(running.url))
        log = running.output()
    print(report.summary())
    assert report.ok, report.summary()
    assert report.requests == 120
    assert set(report.kinds) == set(soak.KINDS) and report.disconnects == report.kinds["disconnect"] > 0
    assert report.rss_before_kb and report.rss_after_kb  # memory was measured, not skipped
    assert "Traceback" not in log and "unhandled error" not in log
    # Negative control: the same checks, holding wrong references, report every request.
    assert {failure.split(" ", 1)[0] for failure in control} == {"chat", "stream", "embeddings"}, control


async def _with_wrong_references(url: str) -> list[str]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        checker = soak.Soak(soak.SoakConfig(url=url, max_tokens=4), client)
        await checker.discover()
        await checker.prepare()
        checker.report.failures.clear()
        for prompt, reference in checker.references.items():
            checker.references[prompt] = soak.Reference(reference.text + " (wrong)", reference.finish_reason,
                                                        reference.completion_tokens)
        checker.vectors = {text: [-x for x in vector] for text, vector in checker.vectors.items()}
        for kind in ("chat", "stream", "embed"):
            await checker.one(kind, random.Random(1))
        await checker.one("bad", random.Random(2))  # a correct refusal is not a failure
    return checker.report.failures
