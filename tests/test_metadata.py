"""metadata.jsonl captions (lcm_jax.data.sources, the Hugging Face imagefolder convention): a bad
line is an error naming path:line, raised before anything compiles; rows naming no image and
images with no caption are counted in a warning, never trained on silently."""
import json
import logging
import os
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import loop, trainer  # noqa: E402
from lcm_jax.data.sources import FolderSource, load_folder  # noqa: E402


def make_folder(root, lines, images=("a.png", "b.png")):
    """Images (solid 8x8 PNGs) and a metadata.jsonl of ``lines`` (str: written as UTF-8, bytes: as is)."""
    os.makedirs(root, exist_ok=True)
    for name in images:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        Image.new("RGB", (8, 8), (200, 30, 30)).save(os.path.join(root, name))
    with open(os.path.join(root, "metadata.jsonl"), "wb") as f:
        f.write(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(root)


def row(name, text):
    return json.dumps({"file_name": name, "text": text}, ensure_ascii=False)


READERS = {"FolderSource": FolderSource, "load_folder": lambda d: load_folder(d, 8)}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("line, match", [
    ('["a.png", "a cat"]', r"got '\[\"a.png\", \"a cat\"\]', expected a JSON object"),  # valid JSON, not an object
    ('"a.png"', "got '\"a.png\"', expected a JSON object"),
    (row("a.png", None), r"'text' of 'a.png' is None: expected a string caption"),  # not the caption "None"
    (row("a.png", 7), r"'text' of 'a.png' is 7: expected a string caption"),
    (json.dumps({"file_name": None, "text": "x"}), r"'file_name' is None"),
    (json.dumps({"file": "a.png", "text": "x"}), r"no 'file_name' key \(it has \['file', 'text'\]\)"),
    ("{not json", "not JSON"),
])
def test_bad_line_is_an_error_naming_the_line(tmp_path, reader, line, match):
    d = make_folder(tmp_path / "d", [row("b.png", "fine"), line])
    with pytest.raises(ValueError, match=f"metadata.jsonl:2: {match}"):
        READERS[reader](d)


@pytest.mark.parametrize("reader", READERS)
def test_latin1_file_is_an_error_naming_the_line(tmp_path, reader):
    d = make_folder(tmp_path / "d", [row("a.png", "cat").encode(), row("b.png", "café").encode("latin-1")])
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: not UTF-8 \(byte 0xe9 at column 36\)") as e:
        READERS[reader](d)
    assert not isinstance(e.value, UnicodeDecodeError)  # ours, with the line, not the codec's


def test_good_rows_utf8_bom_and_list_captions(tmp_path):
    d = make_folder(tmp_path / "d", [b"\xef\xbb\xbf" + row("a.png", "café").encode(), "",
                                     row("./b.png", ["first", "second"])])
    src = FolderSource(d)
    assert src.paths == ["a.png", "b.png"] and src.captions == ["café", "first"]
    assert load_folder(d, 8)[1] == ["café", "first"]


def test_rows_naming_no_image_and_images_without_caption_are_counted(tmp_path, caplog):
    d = make_folder(tmp_path / "d", [row("a.png", "cat"), row("A.PNG", "case"), row("gone.png", "deleted"),
                                     row("notes.txt", "not an image")],
                    images=("a.png", "b.png", "c.png", "sub/d.png"))
    with open(os.path.join(d, "c.txt"), "w") as f:
        f.write("from the sidecar")
    for reader in READERS.values():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            reader(d)
        text = caplog.text
        assert "3 of 4 metadata.jsonl rows" in text and "name no image" in text
        assert "metadata.jsonl:2 'A.PNG'" in text and "metadata.jsonl:3 'gone.png'" in text
        assert "2 of 4 images" in text and "no metadata.jsonl row and no .txt sidecar" in text
        assert "b.png, sub/d.png" in text
    assert load_folder(d, 8)[1] == ["cat", "", "from the sidecar", ""]


def test_repeated_file_name_is_warned_and_the_last_wins(tmp_path, caplog):
    d = make_folder(tmp_path / "d", [row("a.png", "old"), row("b.png", "b"), row("a.png", "new")])
    with caplog.at_level(logging.WARNING):
        assert FolderSource(d).captions == ["new", "b"]
    assert "1 rows of" in caplog.text and "metadata.jsonl:3 repeats" in caplog.text


def test_load_folder_reads_subfolder_metadata_like_the_folder_source(tmp_path, caplog):
    """The in-memory loader (the digits teacher) used to read only the top metadata.jsonl."""
    d = make_folder(tmp_path / "d", [row("a.png", "top")], images=("a.png",))
    make_folder(tmp_path / "d" / "sub", [row("b.png", "in sub")], images=("b.png",))
    with caplog.at_level(logging.WARNING):
        assert load_folder(d, 8)[1] == FolderSource(d).captions == ["top", "in sub"]
    assert "no caption" not in caplog.text and "name no image" not in caplog.text


def test_trainer_refuses_a_bad_metadata_line_before_compiling(teacher, tmp_path, monkeypatch):
    from configs import tiny
    d = make_folder(tmp_path / "d", [row("a.png", "cat"), row("b.png", None)])
    c = tiny.get_config()
    c.pretrained, c.tiny_teacher, c.mesh.data, c.num_steps = teacher, False, 1, 1
    c.data.source, c.data.path = "folder", d
    monkeypatch.setattr(loop, "compile_step", lambda *a, **k: pytest.fail("compiled before reading the metadata"))
    with pytest.raises(ValueError, match=r"metadata.jsonl:2: 'text' of 'b.png' is None"):
        trainer.train(c, str(tmp_path / "run"))
