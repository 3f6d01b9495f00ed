"""Bad input a user produces (a stray quote, Excel's BOM, Latin-1 bytes, a header-only file, an
--out that is a file) ends in one line naming the file, row or key and the fix (exit 2), never a
silent loss of rows or a traceback; a bug still shows its traceback."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from xlip.cli import main
from xlip.data.manifest import ManifestError, load_manifest, read_rows
from xlip.data.validate import validate
from xlip.errors import XlipError

HEADER = "image,text,labels,split,patient_id"


def images(root, n: int) -> list[str]:
    (root / "img").mkdir(exist_ok=True)
    for i in range(n):
        px = np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8)
        Image.fromarray(px).save(root / "img" / f"{i}.png")
    return [f"img/{i}.png" for i in range(n)]


def write_lines(path, lines: list[str], encoding: str = "utf-8"):
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def csv_lines(root, n: int, text=lambda i: f"FINDINGS: Row {i}. IMPRESSION: Effusion.") -> list:
    return [HEADER] + [f"{img},{text(i)},Pleural Effusion,train,p{i}"
                       for i, img in enumerate(images(root, n))]


def test_a_stray_quote_that_swallows_rows_is_refused_with_its_row(tmp_path, capsys):
    # a report typed as '"Patchy opacity' (the quote never meant as CSV quoting); a later
    # report quotes a word, which closes the field ten lines on: 50 of 60 rows would be read
    def text(i):
        return {5: '"Patchy opacity', 15: 'Small "focal" opacity'}.get(i, f"Row {i} clear")

    m = write_lines(tmp_path / "m.csv", csv_lines(tmp_path, 60, text))
    assert len(list(csv.reader(m.open(newline="")))) - 1 == 50  # what a plain reader gets
    with pytest.raises(ManifestError, match=r"data row 6 \(line 7\): a quote opens in its "
                                            r"'text' field and does not close until line 17"):
        load_manifest(m)
    rep = validate([m], check_images=False)
    assert not rep.ok and "data row 6" in rep.problems[0].message
    assert main(["data", "validate", str(m), "--no-images"]) == 1
    # the same quote left open to the end of the file
    m2 = write_lines(tmp_path / "m2.csv", csv_lines(tmp_path, 20, lambda i: '"Stray' if i == 3
                                                      else "ok"))
    with pytest.raises(ManifestError, match=r"data row 4 \(line 5\).*until line 21, so 16 "):
        read_rows(m2)


def test_quoted_multi_line_reports_are_fine(tmp_path):
    img = images(tmp_path, 1)[0]
    m = write_lines(tmp_path / "m.csv", [
        HEADER, f'{img},"FINDINGS: Heart normal, lungs clear, no effusion.\nIMPRESSION: normal, '
                f'stable, unchanged.",No Finding,train,p0'])
    (r,) = load_manifest(m)
    assert r.text.count("\n") == 1 and r.labels == ("No Finding",)


def test_a_report_over_the_csv_field_limit_names_the_row(tmp_path):
    lines = csv_lines(tmp_path, 3)
    lines[2] = lines[2].replace("FINDINGS", '"' + "x" * (csv.field_size_limit() + 10))
    m = write_lines(tmp_path / "m.csv", lines)
    with pytest.raises(ManifestError, match=r"not a valid CSV row \(field larger than field "
                                            r"limit.*quote opens in data row 2 \(line 3\)"):
        read_rows(m)


def test_a_utf8_bom_does_not_hide_the_first_column(tmp_path):
    m = write_lines(tmp_path / "m.csv", csv_lines(tmp_path, 3), encoding="utf-8-sig")
    assert m.read_bytes().startswith(b"\xef\xbb\xbf")
    rows = load_manifest(m)
    assert len(rows) == 3 and all(r.image.endswith(".png") for r in rows)
    assert validate([m]).ok


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    lines = csv_lines(tmp_path, 3)
    lines[2] = lines[2].replace("Row 1", "Row 1 café")
    m = write_lines(tmp_path / "m.csv", lines, encoding="latin-1")
    with pytest.raises(ManifestError, match=r"m.csv line 3: not UTF-8 text \(byte 0xe9\)"):
        load_manifest(m)


def test_a_header_only_manifest_does_not_pass_validate(tmp_path, capsys):
    m = write_lines(tmp_path / "m.csv", [HEADER])
    rep = validate([m])
    assert not rep.ok and "no data rows" in rep.problems[0].message
    assert main(["data", "validate", str(m)]) == 1
    with pytest.raises(ManifestError, match="no data rows"):
        load_manifest(m)


@pytest.mark.parametrize("argv", [
    ["data", "synth", "--n-train", "4", "--n-test", "2", "--out", "{file}"],
    ["tokenizer", "train", "{manifest}", "--out", "{file}"],
    ["pretrain", "train.out_dir={file}", "data.sources=[{{manifest: {manifest}}}]"],
    ["demo", "--out", "{file}"],
    ["data", "shard", "{manifest}", "--out", "{file}"],
    ["ablate", "--demo", "--variants", "clip", "--out", "{file}"],
])
def test_an_out_folder_that_is_a_file_is_one_line(tmp_path, capsys, argv):
    file = tmp_path / "taken.txt"
    file.write_text("a file, not a folder\n")
    m = write_lines(tmp_path / "m.csv", csv_lines(tmp_path, 2))
    argv = [a.format(file=file, manifest=m) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(file) in err[0] and "is an existing file" in err[0], err


def test_an_unwritable_out_folder_is_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["data", "synth", "--n-train", "4", "--out", str(locked / "x")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import xlip.demo

    def bug(*args, **kwargs):
        raise KeyError("not a user error")

    monkeypatch.setattr(xlip.demo, "run_demo", bug)
    with pytest.raises(KeyError):
        main(["demo", "--out", str(tmp_path / "demo")])


def test_version(capsys):
    from xlip import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"xlip {__version__}"
    ran = subprocess.run([sys.executable, "-m", "xlip", "--version"], capture_output=True,
                         text=True, cwd=ROOT)  # python -m xlip is the same command
    assert ran.returncode == 0 and ran.stdout.strip() == f"xlip {__version__}"


def test_config_show_prints_valid_yaml_and_the_presets(tmp_path, capsys):
    import yaml

    from xlip.config import from_dict

    assert main(["config", "show", "train.lr=0.003"]) == 0
    out = capsys.readouterr()
    cfg = from_dict(yaml.safe_load(out.out))
    assert cfg.train.lr == 0.003 and "demo" in out.err and "base (768/12/12)" in out.err
    assert main(["config", "show", "--preset", "demo", "--out", str(tmp_path)]) == 0
    demo = from_dict(yaml.safe_load(capsys.readouterr().out))
    assert demo.train.out_dir == str(tmp_path) and demo.vision.stem == "hybrid"
    assert main(["config", "show", "--preset", "huge"]) == 2


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training studies (default: 20000)" in text and "(default: None)" not in text


def test_tokenizer_says_when_the_vocabulary_is_smaller_than_asked(tmp_path, capsys):
    m = write_lines(tmp_path / "m.csv", csv_lines(tmp_path, 3))
    assert main(["tokenizer", "train", str(m), "--out", str(tmp_path / "tok"),
                 "--vocab-size", "1000"]) == 0
    err = capsys.readouterr().err
    assert "--vocab-size 1000 asked for more tokens than these reports yield" in err


def test_a_row_with_more_fields_than_columns_is_refused(tmp_path):
    img = images(tmp_path, 2)
    m = write_lines(tmp_path / "m.csv", ["image,text,split,patient_id",
                                         f"{img[0]},lungs clear, no effusion,train,p0"])
    with pytest.raises(ManifestError, match=r"data row 1 \(line 2\): 5 fields for 4 columns"):
        read_rows(m)
    ok = write_lines(tmp_path / "ok.csv", ["image,text,split,patient_id",
                                           f"{img[0]},lungs clear,train,p0,",  # Excel's comma
                                           f"{img[1]},\"heart normal, no effusion\",train,p1"])
    assert [r["text"] for r in read_rows(ok)] == ["lungs clear", "heart normal, no effusion"]
    dup = write_lines(tmp_path / "dup.csv", ["image,text,text", f"{img[0]},a,b"])
    with pytest.raises(ManifestError, match="names column.s. text twice"):
        read_rows(dup)


def test_text_label_on_a_latin1_csv_is_one_line(tmp_path, capsys):
    src = tmp_path / "r.csv"
    src.write_bytes("id,text\n1,Caf\xe9 opacity.\n".encode("latin-1"))
    assert main(["text", "label", str(src), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src}: not UTF-8 text (byte 0xe9)" in err[0]


def test_zero_shot_of_an_untrained_model_is_refused(tmp_path, capsys):
    assert main(["eval", "benchmark", "nih-cxr14", "--model", str(tmp_path), "--data-root",
                 str(tmp_path), "--init", "random", "--out", str(tmp_path / "o")]) == 2
    assert "--init random applies to --protocol probe" in capsys.readouterr().err


def test_a_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    """The lock of a run folder, held by another process: refused with its pid; once that
    process is killed (no clean exit), the lock is free again: no stale lock file to remove."""
    from xlip.files import exclusive

    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom xlip.files import exclusive\n"
         f"with exclusive({str(lock)!r}, 'run', 'wait'):\n"
         "    print('held', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(XlipError, match=rf"^run: in use by another xlip process "
                                            rf"\(pid {holder.pid}\); wait$"):
            with exclusive(lock, "run", "wait"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "run", "wait"):
        assert lock.read_text() == f"{os.getpid()}\n"


def test_a_file_system_without_locks_runs_unguarded_with_a_note(tmp_path, monkeypatch, capsys):
    """Some cluster file systems refuse flock (ENOLCK, ENOSYS): training must still run there,
    with a note, not stop with a traceback."""
    import errno
    import fcntl

    from xlip.files import exclusive

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = False
    with exclusive(tmp_path / ".lock", "train.out_dir x", "wait"):
        ran = True
    assert ran
    assert "cannot lock here (No locks available); train.out_dir x runs unguarded" in \
        capsys.readouterr().err
