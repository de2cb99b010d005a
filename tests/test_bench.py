"""`fastllm bench` against the real server on 127.0.0.1: the same load it puts on a peer's server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from serving import Server, free_port

from fastllm.bench.summary import percentile

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastllm", "bench", *args], capture_output=True, text=True,
                          timeout=600)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_chat_sweep_reports_every_level_with_exact_token_counts(server: Server, tmp_path: Path) -> None:
    out = _bench(f"{server.url}/v1", "--concurrency", "1,3", "--requests", "1", "--repeat", "2",
                 "--max-tokens", "12", "--label", "fastllm", "--json", str(tmp_path / "r.json"),
                 "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["machine"]["cores"] >= 1
    (run,) = report["runs"]
    assert run["model"] == CHAT  # discovered from /v1/models
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 3]
    for level in run["levels"]:
        # Each round sends max(4, clients) requests; ignore_eos keeps every answer at max_tokens.
        assert level["requests"] == 2 * max(4, level["concurrency"])
        assert level["errors"] == 0
        assert level["tokens_per_request"] == 12
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"] <= level["e2e_p95_ms"]
        assert 0 < level["itl_p50_ms"] <= level["itl_p95_ms"]
        assert level["tok_s"] > 0 and level["req_s"] > 0
    table = (tmp_path / "r.md").read_text()
    assert "| fastllm | 1 |" in table and "| fastllm | 3 |" in table
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_embeddings_mode_and_merging_reports(server: Server, tmp_path: Path) -> None:
    out = _bench(f"{server.url}/v1", "--embeddings", "--model", EMBED, "--concurrency", "1,16", "--repeat", "1",
                 "--label", "minilm", "--json", str(tmp_path / "e.json"))
    assert out.returncode == 0, out.stderr
    (run,) = json.loads((tmp_path / "e.json").read_text())["runs"]
    assert run["mode"] == "embeddings"
    assert [(lv["concurrency"], lv["errors"], lv["requests"]) for lv in run["levels"]] == [(1, 0, 8), (16, 0, 8)]
    assert all(lv["tok_s"] > 0 for lv in run["levels"])
    chat = _bench(f"{server.url}/v1", "--concurrency", "1", "--requests", "1", "--repeat", "1", "--max-tokens", "4",
                  "--temperature", "1", "--label", "chat", "--json", str(tmp_path / "c.json"))
    assert chat.returncode == 0, chat.stderr
    (sampled,) = json.loads((tmp_path / "c.json").read_text())["runs"][0]["levels"]
    assert sampled["errors"] == 0 and sampled["tokens_per_request"] == 4
    merged = _bench("--merge", str(tmp_path / "e.json"), "--merge", str(tmp_path / "c.json"),
                    "--plot", str(tmp_path / "both.png"))
    assert merged.returncode == 0, merged.stderr
    assert "| minilm | 16 |" in merged.stdout and "| chat | 1 |" in merged.stdout
    assert "inputs/s" in merged.stdout and "gen tok/s" in merged.stdout
    assert (tmp_path / "both.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "no-such-model"], "HTTP 404"),
        (["--concurrency", "1,x"], "--concurrency"),
        (["--temperature", "-1"], "--temperature"),
        ([], ""),
    ],
)
def test_bad_targets_and_options_fail_with_one_clear_line(server: Server, args: list[str], expected: str) -> None:
    url = f"{server.url}/v1" if args else f"http://127.0.0.1:{free_port()}/v1"  # [] = nobody listening
    out = _bench(url, "--repeat", "1", "--concurrency", "1", *args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert expected in out.stderr
    if not args:
        assert "cannot list the models" in out.stderr


def test_merge_of_a_file_that_is_not_a_report_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"runs": 3}')
    out = _bench("--merge", str(bogus))
    assert out.returncode == 1
    assert "is not a bench report" in out.stderr and "Traceback" not in out.stderr
