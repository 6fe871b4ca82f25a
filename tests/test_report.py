"""`secure-mor report`: contents, verdicts, escaping of untrusted fields, no external
references, and a real headless browser that loads the page and decodes every image."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import dp_accounting
import pytest
from typer.testing import CliRunner

from secure_mor.audits.recompute import event_from_json
from secure_mor.cli import app
from secure_mor.crypto.signing import Signer, load_signer, save_signer
from secure_mor.ledger import (
    KIND_DP_TRAINING,
    KIND_REWARD_RELEASE,
    Budget,
    Ledger,
    dp_sgd_event,
    line_hash,
    no_privacy_cost_event,
)

DELTA = 1e-5
DP_RUN = (1.0, 0.125, 16)  # noise multiplier, sample rate, steps
EVIL = "<script>alert(1)"  # a party name (no "/": it is also a key file's name)
EVIL_FIELD = "<img src=x onerror=alert(2)></table>"
runner = CliRunner()


def honest_epsilon() -> float:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(event_from_json(dp_sgd_event(*DP_RUN)))
    return accountant.get_epsilon(DELTA)


def build_run(root: Path) -> Path:
    """A run directory: an honest signed ledger (client-0's DP-SGD run, two post-processing
    releases, one by a party with a hostile name), keys, one results.json, an SFT evaluation and
    two empirical audits (one with unknown extra fields)."""
    run = root / "run"
    signers = {name: Signer.generate(name) for name in ("client-0", "authority", EVIL)}
    for signer in signers.values():
        save_signer(signer, run / "keys")
    ledger = Ledger(run / "ledger.jsonl")
    eps = honest_epsilon()
    ledger.append(
        signers["client-0"], KIND_DP_TRAINING, mechanism=dp_sgd_event(*DP_RUN), epsilon=eps, delta=DELTA,
        accountant="pld", total_epsilon=eps, budget=Budget(8.0, DELTA), details={"arch": EVIL_FIELD},
    )  # fmt: skip
    for name in ("authority", EVIL):
        ledger.append(
            signers[name], KIND_REWARD_RELEASE, mechanism=no_privacy_cost_event(), epsilon=0.0, delta=0.0,
            accountant="none (post-processing)", total_epsilon=0.0,
        )  # fmt: skip
    entries = ledger.entries()
    family = {"color": (0.8, 0.95), "shape": (0.4, 0.55)}
    results = {
        "schema": "secure-mor/results/v1",
        "config": {"fusion": "mor", "epsilon": 8.0, "delta": DELTA, "seed": 0, "objective": EVIL_FIELD},
        "run_id": "mor-s0-test",
        "accuracy": {
            stage: {
                "overall": {"accuracy": 0.6 if i == 0 else 0.75, "n": 40},
                "per_family": {f: {"accuracy": acc[i], "n": 20} for f, acc in family.items()},
            }
            for i, stage in enumerate(("sft", "aligned"))
        },
        "clients": {"client-0": {"arch": "cnn-gru", "family": "color", "budget_epsilon": 8.0, "total_epsilon": eps}},
        "grpo": {"steps": 4, "rounds": 2, "skipped_rounds": 0, "reward_first": 1.234, "reward_last": 2.468},
        "timings": {"grpo_s": 42.5, "total_s": 99.5},
        "ledger": {"entries": len(entries), "head": line_hash(entries[-1])},
    }
    (run / "align" / "mor").mkdir(parents=True)
    (run / "align" / "mor" / "results.json").write_text(json.dumps(results))
    (run / "align" / "mor" / "grpo_log.json").write_text(
        json.dumps({"history": [{"reward": 1.234}, {"reward": 2.468}]})
    )
    (run / "eval").mkdir()
    (run / "eval" / "sft.json").write_text(json.dumps(results["accuracy"]["sft"]))
    (run / "audits").mkdir()
    audit = {"schema": "secure-mor/empirical-audit/v1", "arch": "cnn-gru", "epsilon_claimed": 8.0, "delta": DELTA,
             "canaries": 500, "guesses": 100, "correct": 97, "confidence": 0.95, "epsilon_lower_bound": 1.2345,
             "seconds": 12.5, "attack": EVIL_FIELD, "future": {"nested": [1, 2]}}  # fmt: skip
    (run / "audits" / "empirical-cnn-gru.json").write_text(json.dumps(audit))
    non_private = {**audit, "arch": "vit-xattn", "epsilon_claimed": None, "epsilon_lower_bound": 6.789}
    (run / "audits" / "empirical-vit-xattn.json").write_text(json.dumps(non_private))
    return run


def report(*args: str | Path):
    result = runner.invoke(app, ["report", *(str(a) for a in args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a test failure
    return result


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """(run directory, report.html text, report.md text, CLI result)."""
    run = build_run(tmp_path_factory.mktemp("honest"))
    result = report(run)
    return run, (run / "report" / "report.html").read_text(), (run / "report" / "report.md").read_text(), result


def test_honest_run_passes_and_shows_the_inputs(honest):
    run, page, markdown, result = honest
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in page
    for text in (page, markdown):
        assert "PASS" in text
        assert "0.800 → 0.950" in text and "0.400 → 0.550" in text  # accuracy before -> after
        assert "1.234" in text and "2.468" in text  # reward first / last
        assert "1.2345" in text and "6.7890" in text  # empirical lower bounds
        assert "non-private (inf)" in text
        assert "8.0000" in text  # client-0's budget
        assert "16 x Poisson(q=0.1250) Gaussian(sigma=1.000)" in text
        assert "42.5" in text
    assert "3 entries" in page and "1 recorded head(s) found" in page
    for png in ("budget.png", "empirical.png", "reward.png"):
        assert (run / "report" / png).read_bytes().startswith(b"\x89PNG")
        assert f"]({png})" in markdown


def test_untrusted_fields_are_escaped(honest):
    _, page, markdown, _ = honest
    for text in (page, markdown):
        assert "<script" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(1)" in text  # shown, as text
    assert page.count("</table>") == page.count("<table") and "</table>" not in markdown
    assert "&lt;img src=x onerror=alert(2)&gt;&lt;/table&gt;" in page  # also the unknown empirical field


def test_the_page_is_self_contained(honest):
    _, page, _, _ = honest
    assert "http://" not in page and "https://" not in page
    references = []

    class Attributes(HTMLParser):
        def handle_starttag(self, tag, attrs):
            references.extend(value for name, value in attrs if name in ("src", "href", "srcset", "action"))

    Attributes().feed(page)
    assert len(references) == 3 and all(r.startswith("data:image/png;base64,") for r in references)
    assert "@import" not in page and "url(" not in page


def test_tampered_ledger_fails_with_line_and_reason(tmp_path):
    run = build_run(tmp_path)
    lines = (run / "ledger.jsonl").read_bytes().split(b"\n")
    at = lines[0].index(b'"time":') + len(b'"time":') + 1  # second digit: the line stays valid JSON
    lines[0] = lines[0][:at] + bytes([lines[0][at] ^ 1]) + lines[0][at + 1 :]
    (run / "ledger.jsonl").write_bytes(b"\n".join(lines))
    result = report(run, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert '<div class="verdict fail"><div class="status">FAIL</div>' in page
    assert "line 1: signature by &#x27;client-0&#x27; does not verify (line altered or re-chained)" in page
    assert "FAIL" in (tmp_path / "out" / "report.md").read_text()


def test_lines_after_the_recorded_head_are_unanchored_and_a_lost_ledger_fails(tmp_path):
    run = build_run(tmp_path)
    lines = (run / "ledger.jsonl").read_bytes().split(b"\n")
    (run / "ledger.jsonl").write_bytes(lines[0] + b"\n")
    result = report(run)  # the ledger now lacks lines 2-3 that results.json anchors
    assert result.exit_code == 1 and "line 3 is not the anchored head" in (run / "report" / "report.html").read_text()
    (run / "ledger.jsonl").unlink()
    result = report(run)
    page = (run / "report" / "report.html").read_text()
    assert result.exit_code == 1 and "no ledger.jsonl, but results.json records releases" in page
    build_run(tmp_path / "again")
    run = tmp_path / "again" / "run"
    authority = load_signer("authority", run / "keys")  # a release after results.json was written
    Ledger(run / "ledger.jsonl").append(authority, KIND_REWARD_RELEASE, mechanism=no_privacy_cost_event(), epsilon=0.0,
                                        delta=0.0, accountant="none", total_epsilon=0.0)  # fmt: skip
    result = report(run)
    page = (run / "report" / "report.html").read_text()
    assert result.exit_code == 3 and "UNANCHORED: lines 4-4 are covered by no recorded head" in page, result.output


def test_an_emptied_ledger_without_any_recorded_head_is_unanchored(tmp_path):
    run = build_run(tmp_path)
    (run / "ledger.jsonl").write_bytes(b"")
    for results in run.glob("**/results.json"):
        results.unlink()
    result = report(run)
    page = (run / "report" / "report.html").read_text()
    assert result.exit_code == 3 and "UNANCHORED: the ledger is empty and no results.json records a head" in page


@pytest.mark.parametrize("line", [b'{"seq": NaN, "party": "client-0"}', b"[" * 100_000 + b"]" * 100_000, b"\xff{"])
def test_hostile_ledger_lines_fail_cleanly(tmp_path, line):
    run = build_run(tmp_path)
    with open(run / "ledger.jsonl", "ab") as ledger:
        ledger.write(line + b"\n")
    result = report(run)
    assert result.exit_code == 1, result.output
    page = (run / "report" / "report.html").read_text()
    assert '<div class="status">FAIL</div>' in page and "line 4: " in page


def test_an_overrun_budget_and_an_empirical_violation_fail(tmp_path):
    run = build_run(tmp_path)
    audit_path = run / "audits" / "empirical-cnn-gru.json"
    audit_path.write_text(json.dumps({**json.loads(audit_path.read_text()), "epsilon_lower_bound": 9.5}))
    result = report(run)
    assert result.exit_code == 1
    page = (run / "report" / "report.html").read_text()
    assert "VIOLATION: lower bound above the claim" in page


def test_missing_pieces_are_stated_not_crashed_on(tmp_path):
    run = tmp_path / "early"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "sft.json").write_text(json.dumps({"overall": {"accuracy": 0.5, "n": 2}, "per_family": {}}))
    result = report(run)
    assert result.exit_code == 3, result.output
    page = (run / "report" / "report.html").read_text()
    assert "NOT VERIFIED" in page and "no ledger" in page and "no results.json yet" in page
    assert "No empirical audit in this run" in page


@pytest.mark.parametrize("make", [lambda p: p / "nowhere", lambda p: p])
def test_not_a_run_directory_is_a_clean_error(tmp_path, make):
    result = report(make(tmp_path))
    assert result.exit_code == 2
    assert "error" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = [...document.images]
    .map(i => (i.complete ? i.naturalWidth + "x" + i.naturalHeight : "0x0")).join(" ");
  document.body.append(out);
});
</script>"""


def dump_dom(page: Path, timeout: float = 60.0) -> str:
    """The DOM after load, from headless Chromium; the browser's whole process group is killed in all cases."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install chromium (the README's test command installs it)")
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            dom, _ = browser.communicate(timeout=timeout)
        finally:
            try:
                os.killpg(browser.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            browser.wait()
    return dom.decode()


def test_a_real_browser_renders_the_report_and_decodes_every_image(honest, tmp_path):
    run, page, _, _ = honest
    dom = dump_dom(run / "report" / "report.html")  # the report as shipped: no script
    assert '<div class="status">PASS</div>' in dom and "Privacy budget per party" in dom
    assert dom.count("<table") == page.count("<table") and "<script" not in dom

    # The same page with a checker that records every image's decoded size (for this test only).
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
    match = re.search(r'<pre id="image-check">([^<]*)</pre>', dump_dom(probe))
    assert match, "the page did not finish loading"
    sizes = match.group(1).split()
    assert len(sizes) == page.count("<img ") == 3
    assert all(int(w) > 100 and int(h) > 100 for w, h in (s.split("x") for s in sizes)), sizes
