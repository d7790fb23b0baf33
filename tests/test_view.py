"""`rlcd-data view`: the pages' data, the spot-check's judgments and their figure, and the server's guards."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from test_quality import data as pair_data_of

from rlcd_data.cli import main
from rlcd_data.errors import RlcdError
from rlcd_data.pipeline.config import BuildConfig
from rlcd_data.pipeline.run import build
from rlcd_data.pipeline.run_options import RunOptions
from rlcd_data.quality import annotations, measures
from rlcd_data.quality.report import inspect_dataset
from rlcd_data.view.pairs import Filters, PairTable


def reply(prompt: str, n: int) -> tuple[str, bool]:
    """A response that depends on the prompt alone (p+ and p- differ in their descriptor), ending in a period."""
    import hashlib

    return f"Reply {hashlib.sha256(prompt.encode()).hexdigest()[:8]}.", True


def built(tmp_path, fake_generator, n=12, name="out", overwrite=False):
    prompts = tmp_path / f"{name}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i} about topic {i % 3}?"}) + "\n" for i in range(n)))
    build(BuildConfig(task="harmless", prompts=str(prompts), output=str(tmp_path / name)),
          RunOptions(overwrite=overwrite), generator=fake_generator(reply), progress=False)
    return tmp_path / name


@pytest.fixture
def folder(tmp_path, fake_generator):
    return built(tmp_path, fake_generator)


def client(table, token=None):
    """A client of the app as `serve` makes it: with a token (another address), or for loopback names only."""
    from starlette.testclient import TestClient

    from rlcd_data.view.app import create_app
    from rlcd_data.view.serve import LOOPBACK_NAMES

    app = create_app(table, token=token, loopback_hosts=None if token else LOOPBACK_NAMES)
    return TestClient(app, base_url="http://127.0.0.1:8765")


# The figure


def judgment(row, left, choice, seed=0):
    return annotations.Judgment(row, seed, left, choice, "2026-12-08T00:00:00+00:00")


def test_agreement_counts_decisive_judgments_with_a_wilson_interval_per_descriptor_bin_and_annotator():
    pairs = [(f"good {i}", f"bad {i}") for i in range(8)]
    data = pair_data_of(pairs)
    data.descriptor_index = [0, 0, 0, 0, 1, 1, 1, 1]
    data.descriptors = {0: "kind / evil", 1: "legal / illegal"}
    data.probabilities = [0.55, 0.65, 0.75, 0.95, 1.0, 0.5, 0.85, 0.9]
    alice = {0: judgment(0, "chosen", "left"), 1: judgment(1, "rejected", "right"), 2: judgment(2, "chosen", "right"),
             3: judgment(3, "chosen", "tie"), 4: judgment(4, "rejected", "left")}
    bob = {0: judgment(0, "rejected", "right"), 4: judgment(4, "chosen", "left"), 5: judgment(5, "chosen", "left")}
    result = annotations.human_agreement({"alice": alice, "bob": bob}, data)
    # preferred chosen: alice rows 0, 1; bob rows 0, 4, 5 -> 5 of 7 decisive, 1 tie
    assert (result["judgments"], result["ties"], result["n"]) == (8, 1, 7)
    assert result["agreement"] == pytest.approx(5 / 7)
    assert result["interval"] == pytest.approx(list(measures.wilson_interval(5, 7)))
    assert result["annotators"]["alice"]["agreement"] == pytest.approx(2 / 4)
    assert result["annotators"]["bob"]["agreement"] == 1.0
    assert result["per_descriptor"]["kind / evil"]["n"] == 4 and result["per_descriptor"]["legal / illegal"]["n"] == 3
    bins = {tuple(b["bin"]): b for b in result["by_confidence"]}
    assert bins[(0.9, 1.0)]["judgments"] == 3  # rows 3 (0.95) and 4 (1.0, twice): 1.0 is in the top bin
    assert bins[(0.5, 0.6)]["agreement"] == 1.0  # rows 0 (twice) and 5
    assert result["between_annotators"] == [{"annotators": ["alice", "bob"], "rows": 2, "same_choice": 0.5}]
    assert annotations.human_agreement({}, data) is None


def test_a_later_judgment_of_a_row_replaces_the_earlier_and_a_bad_line_is_named(tmp_path):
    annotations.record(tmp_path, "ann", judgment(3, "chosen", "left"))
    annotations.record(tmp_path, "ann", judgment(3, "chosen", "right"))
    assert annotations.read(tmp_path) == {"ann": {3: judgment(3, "chosen", "right")}}
    with open(tmp_path / "annotations" / "ann.jsonl", "a") as f:
        f.write('{"row": 1, "seed": 0, "left": "up", "choice": "left", "time": ""}\n')
    with pytest.raises(RlcdError, match=r"ann.jsonl, line 3: not a judgment"):
        annotations.read(tmp_path)
    (tmp_path / "annotations" / "ann.jsonl").write_text(
        json.dumps({"row": 1, "seed": 0, "left": "chosen", "choice": "left", "time": "", "split": "test"}) + "\n")
    assert annotations.read(tmp_path) == {} and list(annotations.read(tmp_path, "test")["ann"]) == [1]
    with pytest.raises(RlcdError, match="annotator '../x'"):
        annotations.annotator_file(tmp_path, "../x")


def test_row_flags_name_the_rows_behind_the_reports_counts():
    fox = "The quick brown fox jumps over the lazy dog near the river bank today"
    pairs = [("Same  answer.", "same answer."), (fox + ".", fox + ", again."), ("", "Fine."),
             ("Cut off in the mid", "Done."), ("Short.", "Also short.")]
    data = pair_data_of(pairs, max_new_tokens=5)
    flags = measures.row_flags(data)
    assert flags == [["identical"], ["near-identical", "chosen at token limit", "rejected at token limit"],
                     ["chosen empty"], ["chosen unfinished", "chosen at token limit"], []]
    shape = measures.shape(data)
    assert shape["identical"] == 1 and shape["near_identical"] == 1 and shape["empty"]["chosen"] == 1
    assert shape["unfinished"]["chosen"] == 1 and shape["at_token_limit"]["chosen"] == 2


# The pages' data


def test_rows_are_searched_and_filtered_on_the_whole_table(folder):
    table = PairTable(str(folder))
    assert len(table) == 12 and len(table.matching(Filters())) == 12
    assert table.matching(Filters(query="TOPIC 1")) == [1, 4, 7, 10]  # case-insensitive, over the conversation
    assert table.row(4)["flags"] is None  # not computed yet: the page says so
    assert table.matching(Filters(flagged=True)) == []  # a filter on flags computes them
    row = table.row(4)
    assert row["chosen"].startswith("Reply ") and row["descriptor"] and row["p_plus"] and row["flags"] == []
    target = row["chosen"].split()[1].rstrip(".")
    assert table.matching(Filters(query=target)) == [4]  # and over the responses
    index = table.data.descriptor_index[4]
    assert 4 in table.matching(Filters(descriptor=index))
    assert all(table.data.descriptor_index[i] == index for i in table.matching(Filters(descriptor=index)))
    assert table.matching(Filters(length_min=3)) == []  # "Reply xxxxxxxx." is 2 tokens of the fake generator
    assert table.question == "Which of these assistant responses is more helpful, honest and inoffensive?"


def test_a_spot_check_is_a_seeded_blind_sample(folder):
    table = PairTable(str(folder))
    sample = table.sample(5, seed=7)
    assert sample == table.sample(5, seed=7) and len(set(sample)) == 5 and sample != table.sample(5, seed=8)
    assert sorted(table.sample(50, seed=7)) == list(range(12))  # at most every row
    sides = [table.left_side(7, r) for r in range(12)]
    assert set(sides) == {"chosen", "rejected"}
    for r in sample:
        item = table.blind_item(7, r)
        assert set(item) == {"row", "conversation", "left", "right"}  # no label, descriptor or probability
        left = item["left"]
        assert left == (table.data.chosen[r] if table.left_side(7, r) == "chosen" else table.data.rejected[r])
        assert {item["left"], item["right"]} == {table.data.chosen[r], table.data.rejected[r]}


# The server


def test_the_routes_serve_pages_of_rows_a_blind_sample_and_record_judgments(folder):
    table = PairTable(str(folder))
    with client(table) as c:
        page = c.get("/")
        assert page.status_code == 200 and "rlcd-data view" in page.text
        info = c.get("/api/info").json()
        assert info["rows"] == 12 and info["agreement"] is None and info["plots"]
        rows = c.get("/api/rows", params={"offset": 10, "limit": 5}).json()
        assert rows["total"] == 12 and [r["row"] for r in rows["rows"]] == [10, 11]
        assert c.get(f"/api/plot/{len(info['plots']) - 1}").headers["content-type"] == "image/png"
        spot = c.get("/api/spot", params={"seed": 3, "size": 4, "annotator": "ann"}).json()
        assert [i["row"] for i in spot["items"]] == table.sample(4, 3) and spot["judged"] == {}
        assert "descriptor" not in json.dumps(spot["items"]) and "probability" not in json.dumps(spot["items"])
        for item, choice in zip(spot["items"], ("left", "right", "tie")):
            answer = c.post("/api/judge", json={"annotator": "ann", "seed": 3, "size": 4, "row": item["row"],
                                                "choice": choice})
            assert answer.status_code == 200, answer.text
        again = c.get("/api/spot", params={"seed": 3, "size": 4, "annotator": "ann"}).json()
        assert again["judged"] == {str(i["row"]): ch for i, ch in zip(spot["items"], ("left", "right", "tie"))}
        agreement = c.get("/api/agreement").json()
        assert agreement["judgments"] == 3 and agreement["ties"] == 1
    saved = annotations.read(folder)["ann"]
    assert sorted(saved) == sorted(i["row"] for i in spot["items"][:3])
    assert all(j.left == table.left_side(3, j.row) and j.seed == 3 for j in saved.values())


def test_bad_row_ids_and_other_paths_are_refused(folder):
    table = PairTable(str(folder))
    outside = next(r for r in range(12) if r not in table.sample(3, 0))
    with client(table) as c:
        for body in ({"annotator": "a", "seed": 0, "size": 3, "row": outside, "choice": "left"},
                     {"annotator": "a", "seed": 0, "size": 3, "row": -1, "choice": "left"},
                     {"annotator": "a", "seed": 0, "size": 3, "row": "1", "choice": "left"},
                     {"annotator": "a", "seed": 0, "size": 3, "row": table.sample(3, 0)[0], "choice": "both"},
                     {"annotator": "../../etc", "seed": 0, "size": 3, "row": table.sample(3, 0)[0], "choice": "left"},
                     {"annotator": "a", "seed": 0, "size": 3}):
            answer = c.post("/api/judge", json=body)
            assert answer.status_code == 400 and "\n" not in answer.json()["error"], body
        assert c.post("/api/judge", content=b"row=1", headers={"content-type": "text/plain"}).status_code == 415
        for path in ("/api/plot/99", "/static/../pairs.py", "/static/%2e%2e/pairs.py", "/../rlcd_build.yaml",
                     "/rlcd_build.yaml", "/data/train-00000-of-00001.parquet", "/api/rows/../../README.md"):
            assert c.get(path).status_code == 404, path
        assert c.get("/api/rows", params={"offset": "x"}).status_code == 400
        assert c.get("/api/info", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding
    assert not (folder / "annotations").exists()


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
def test_a_folder_that_cannot_be_written_is_one_line_and_keeps_earlier_judgments(folder, monkeypatch, capsys, error):
    import os

    table = PairTable(str(folder))
    rows = table.sample(2, 0)
    with client(table) as c:
        first = {"annotator": "a", "seed": 0, "size": 2, "row": rows[0], "choice": "left"}
        assert c.post("/api/judge", json=first).status_code == 200
        before = (folder / "annotations" / "a.jsonl").read_bytes()

        def failing_replace(src, dst):
            raise OSError(error, os.strerror(error))

        monkeypatch.setattr(annotations.os, "replace", failing_replace)
        answer = c.post("/api/judge", json={**first, "row": rows[1]})
    assert answer.status_code == 507
    message = answer.json()["error"]
    assert "a.jsonl: cannot save the judgment" in message and os.strerror(error) in message and "\n" not in message
    assert capsys.readouterr().err == f"rlcd-data view: error: {message}\n"
    assert (folder / "annotations" / "a.jsonl").read_bytes() == before
    assert [p.name for p in (folder / "annotations").iterdir()] == ["a.jsonl"]  # no temporary file left


def test_another_address_needs_a_token_and_the_token_opens_it(folder):
    from rlcd_data.view.serve import serve

    table = PairTable(str(folder))
    with pytest.raises(RlcdError, match="0.0.0.0 is not a loopback address: serving it needs a token"):
        serve(table, host="0.0.0.0", port=0, token=None)
    with client(table, token="s3cret") as c:
        assert c.get("/api/info").status_code == 403
        assert c.get("/api/info", params={"token": "wrong"}).status_code == 403
        assert c.get("/", params={"token": "s3cret"}).status_code == 200  # sets the cookie
        assert c.get("/api/info").status_code == 200
    assert "s3cret" not in "".join(p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file())


def test_a_taken_port_and_a_file_source_without_a_folder_are_one_line(folder, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["view", str(folder), "--port", str(port)]) == 2
    taken_line = f"rlcd-data: error: port {port} on 127.0.0.1 is taken: choose another with --port\n"
    assert capsys.readouterr().err == taken_line
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    assert main(["view", str(pairs)]) == 2
    assert "not a dataset folder; name a folder for the judgments with --annotations" in capsys.readouterr().err


# The server as a process


def start_server(folder, *extra):
    process = subprocess.Popen([sys.executable, "-m", "rlcd_data", "view", str(folder), "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert " at http://127.0.0.1:" in line, line + process.stderr.read()
    return process, line.split(" at ", 1)[1].strip()


def call(url, path, body=None):
    request = urllib.request.Request(url.rstrip("/") + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_kill_9_mid_spot_check_then_a_restart_continues(folder):
    process, url = start_server(folder)
    try:
        spot = call(url, "/api/spot?seed=5&size=8&annotator=kim")[1]
        for item in spot["items"][:3]:
            assert call(url, "/api/judge", {"annotator": "kim", "seed": 5, "size": 8, "row": item["row"],
                                            "choice": "left"})[0] == 200
    finally:
        process.kill()  # SIGKILL
        process.wait()
    process, url = start_server(folder)
    try:
        again = call(url, "/api/spot?seed=5&size=8&annotator=kim")[1]
        assert again["judged"] == {str(item["row"]): "left" for item in spot["items"][:3]}
        assert call(url, "/api/agreement")[1]["judgments"] == 3
    finally:
        process.terminate()
        process.wait()


def test_two_clients_judging_at_once_lose_nothing(folder):
    process, url = start_server(folder)
    rows = PairTable(str(folder)).sample(12, 0)
    failures = []

    def annotate(name, choice):
        for row in rows:
            status, body = call(url, "/api/judge", {"annotator": name, "seed": 0, "size": 12, "row": row,
                                                    "choice": choice})
            if status != 200:
                failures.append(body)

    try:
        threads = [threading.Thread(target=annotate, args=args) for args in (("ana", "left"), ("ben", "right"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        process.terminate()
        process.wait()
    assert not failures
    saved = annotations.read(folder)
    assert {name: sorted(rows_) for name, rows_ in saved.items()} == {"ana": sorted(rows), "ben": sorted(rows)}
    assert len((folder / "annotations" / "ana.jsonl").read_text().splitlines()) == 12
    agreement = annotations.human_agreement(saved, PairTable(str(folder)).data)
    assert agreement["between_annotators"][0]["same_choice"] == 0.0  # one always left, the other always right


# The figure elsewhere: inspect, the card, compare, push, a new build


def judge_all(folder, choice="left", annotator="ann"):
    table = PairTable(str(folder))
    for row in table.sample(len(table), 0):
        table.judge(annotator, 0, len(table), row, choice)
    return table


def test_inspect_and_the_card_show_the_figure_and_a_new_build_drops_old_judgments(folder, tmp_path, fake_generator,
                                                                                   capsys):
    table = judge_all(folder)
    expected = sum(table.left_side(0, r) == "chosen" for r in range(12))  # "left" agrees when chosen was left
    result = inspect_dataset(str(folder), write_card=True)
    assert result["human"]["n"] == 12 and result["human"]["agreement"] == pytest.approx(expected / 12)
    assert any(line.startswith("People ") and "of 12 decisive judgments" in line for line in result["verdicts"])
    card = (folder / "README.md").read_text()
    assert f"| human agreement (people prefer chosen; `rlcd-data view` spot-check) | {expected / 12:.3f}" in card
    assert main(["inspect", str(folder)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("human agreement"))
    assert line.split()[4:] == [f"{expected / 12:.3f}", *line.split()[5:7], "12"]
    built(tmp_path, fake_generator, n=12, name="out", overwrite=True)  # the same folder, built anew
    assert not (folder / "annotations").exists()


def test_compare_sets_two_datasets_figures_side_by_side(tmp_path, fake_generator, capsys):
    a, b = built(tmp_path, fake_generator, name="a"), built(tmp_path, fake_generator, name="b")
    judge_all(a, "left")
    judge_all(b, "tie")
    assert main(["compare", str(a), str(b), "--plot", str(tmp_path / "compare.png")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("human agreement"))
    assert line.split()[-1] == "n/a" and ", 12" in line  # b: every judgment "can't tell"
