"""Adapter files under failure: interrupted or killed saves, truncated and forged files, planted pickles (beyond test_io.py)."""

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

import goft
from goft.io import CONFIG_NAME, WEIGHTS_NAME


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def _adapted(seed: int, adapter_name: str = "default") -> nn.Module:
    torch.manual_seed(0)  # same frozen base for every model
    model = _Net()
    goft.inject(model, target_modules=["up", "down"], scale=True, modules_to_save=["head"], adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(7))


def _files(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, goft.adapter_configs(model), [type(m) for m in model.modules()]


def _assert_same(model, state):
    tensors, configs, types = state
    assert set(model.state_dict()) == set(tensors)
    assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items())
    assert goft.adapter_configs(model) == configs and [type(m) for m in model.modules()] == types


@pytest.fixture
def previous(tmp_path):
    """A directory holding a good adapter (seed 1) and the outputs it gives."""
    model = _adapted(1)
    goft.save_adapter(model, str(tmp_path))
    with torch.no_grad():
        return tmp_path, model(X)


def _loads_previous(path, expected):
    torch.manual_seed(0)
    fresh = _Net()
    goft.load_adapter(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), expected, rtol=0, atol=0)


def _fail_on_call(n, exc=OSError("disk full")):
    """A function raising on its n-th call (1-based), passing through before."""
    calls = []

    def wrap(real):
        def inner(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise exc
            return real(*args, **kwargs)

        return inner

    return wrap


@pytest.mark.parametrize(
    "where",
    ["serialising", "writing", "fsync of the tensors", "rename of the tensors", "interrupt while writing",
     "writing the description", "fsync of the description"],
)
def test_a_save_failing_before_the_tensors_are_in_place_keeps_the_previous_adapter(previous, monkeypatch, where):
    # Both files are written in full before either replaces its previous version, so a full disk
    # at the description does not separate the previous tensors from their description either.
    path, expected = previous
    before = _files(path)
    if where == "serialising":
        monkeypatch.setattr(safetensors.torch, "save", _fail_on_call(1, RuntimeError("out of memory"))(safetensors.torch.save))
    elif where in ("writing", "writing the description"):
        real_fdopen = os.fdopen
        opened = []

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            opened.append(f)
            if where == "writing the description" and len(opened) == 1:
                return f

            class Half:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, data):
                    f.write(data[: len(data) // 2])
                    raise OSError("No space left on device")

                def __getattr__(self, name):
                    return getattr(f, name)

            return Half()

        monkeypatch.setattr(os, "fdopen", fdopen)
    elif where == "fsync of the tensors":
        monkeypatch.setattr(os, "fsync", _fail_on_call(1)(os.fsync))
    elif where == "fsync of the description":
        monkeypatch.setattr(os, "fsync", _fail_on_call(2)(os.fsync))
    elif where == "rename of the tensors":
        monkeypatch.setattr(os, "replace", _fail_on_call(1)(os.replace))
    elif where == "interrupt while writing":
        monkeypatch.setattr(os, "fsync", _fail_on_call(1, KeyboardInterrupt())(os.fsync))
    with pytest.raises((OSError, RuntimeError, KeyboardInterrupt)):
        goft.save_adapter(_adapted(2), str(path))
    monkeypatch.undo()
    assert _files(path) == before, "the previous files changed, or a temporary file was left behind"
    _loads_previous(path, expected)


def test_a_save_failing_between_the_two_renames_loads_the_new_adapter(previous, monkeypatch):
    # The two files cannot be replaced in one atomic step. Between the renames the directory
    # holds the new tensors and the previous description: loading must not load a mix (the
    # checksum no longer matches), and neither file is truncated. The new tensors file describes
    # itself, so the new adapter loads from it alone, with a warning.
    path, _ = previous
    old_description = (path / CONFIG_NAME).read_bytes()
    monkeypatch.setattr(os, "replace", _fail_on_call(2, KeyboardInterrupt())(os.replace))
    with pytest.raises(KeyboardInterrupt):
        goft.save_adapter(_adapted(2), str(path))
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (path / CONFIG_NAME).read_bytes() == old_description
    safetensors.torch.load((path / WEIGHTS_NAME).read_bytes())  # complete, not truncated
    model = _Net()
    with pytest.warns(UserWarning, match="does not match the checksum .* describes itself"):
        goft.load_adapter(model, str(path))
    saved = _adapted(2).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items() if ".goft_" in k or k.startswith("head."))
    goft.save_adapter(_adapted(2), str(path))  # saving again repairs the directory
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goft.load_adapter(_Net(), str(path))


def test_a_save_of_the_same_tensors_stopped_between_its_renames_says_how_to_recover(previous, monkeypatch):
    # Saved again under another adapter name, the tensors are the same and only the metadata
    # differs; stopped between the renames, the folder looks like a tensors file whose metadata
    # was edited, which must not load. The refusal names the other cause and its remedy.
    path, expected = previous
    renamed = _adapted(1, adapter_name="other")
    monkeypatch.setattr(os, "replace", _fail_on_call(2, KeyboardInterrupt())(os.replace))
    with pytest.raises(KeyboardInterrupt):
        goft.save_adapter(renamed, str(path))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=f"metadata was changed after saving, or a save of the same tensors into this "
                                         f"folder stopped between writing its two files; if the latter, delete {CONFIG_NAME}"):
        goft.load_adapter(_Net(), str(path))
    (path / CONFIG_NAME).unlink()
    with pytest.warns(UserWarning, match="describes itself"):
        _loads_previous(path, expected)
    with safetensors.safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        assert json.loads(f.metadata()[goft.io.DESCRIPTION_KEY])["adapter_name"] == "other"


@pytest.mark.parametrize("kill_at", [1, 2])
def test_a_save_killed_mid_way_never_leaves_a_truncated_adapter(previous, kill_at):
    # SIGKILL skips every cleanup: the process dies after writing part of a temporary file
    # (kill_at=1: the tensors, 2: the description, the tensors' temporary file complete). Neither
    # file has been replaced yet at either point.
    path, expected = previous
    before = _files(path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_safe_files as t
        import goft
        calls = []
        real_write = os.write
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            calls.append(1)
            if len(calls) == {kill_at}:
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return f

        os.fdopen = fdopen
        goft.save_adapter(t._adapted(2), sys.argv[1])
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    after = _files(path)
    leftovers = sorted(set(after) - {CONFIG_NAME, WEIGHTS_NAME})
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers) and len(leftovers) == kill_at
    assert {k: after[k] for k in before} == before
    _loads_previous(path, expected)
    # A later save succeeds, and removes the leftovers (hidden files that upload_folder would publish).
    with pytest.warns(UserWarning, match=f"removed {kill_at} temporary file.* killed save") as caught:
        goft.save_adapter(_adapted(2), str(path))
    assert caught[0].filename == __file__  # the warning points at the caller's save_adapter
    assert sorted(os.listdir(path)) == [CONFIG_NAME, WEIGHTS_NAME]
    goft.load_adapter(_Net(), str(path))


def test_a_save_leaves_the_temporary_files_of_saves_that_may_still_run(previous):
    # Another process saving into the same folder, on this host or on another sharing it, must
    # find its temporary files where it wrote them; so must anything that is not goft's.
    path, _ = previous
    host = socket.gethostname()
    others = [
        f".{WEIGHTS_NAME}.{os.getpid()}@{host}.abcd1234.tmp",  # a running process on this host
        f".{CONFIG_NAME}.1@another-{host}.abcd1234.tmp",  # another host's
        f".{WEIGHTS_NAME}.{_finished_pid()}@{host}.abcd1234.tmp.part",  # not goft's name
        f".other.json.{_finished_pid()}@{host}.abcd1234.tmp",  # not one of the files saved
        f".{WEIGHTS_NAME}.{10**40}@{host}.abcd1234.tmp",  # no process can have that id
    ]
    for name in others:
        (path / name).write_bytes(b"in progress")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        goft.save_adapter(_adapted(2), str(path))
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, *others])


def _finished_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _resign(path, data: bytes):
    """Writes ``data`` as the tensors file with a matching checksum, so only the parser can object."""
    (path / WEIGHTS_NAME).write_bytes(data)
    description = json.loads((path / CONFIG_NAME).read_text())
    description["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (path / CONFIG_NAME).write_text(json.dumps(description))


def test_truncated_tensors_with_a_matching_checksum_are_refused(previous):
    path, _ = previous
    data = (path / WEIGHTS_NAME).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in sorted({0, 4, 8, 9, header // 2, header - 1, header, header + 1, (header + len(data)) // 2, len(data) - 1}):
        _resign(path, data[:cut])
        model = _Net()
        state = _state(model)
        with pytest.raises(ValueError, match=f"cannot read {WEIGHTS_NAME}"):
            goft.load_adapter(model, str(path))
        _assert_same(model, state)


def _forged_header(data: bytes, edit) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _first(header):
    return next(k for k in sorted(header) if k != "__metadata__")


FORGERIES = {
    "offsets past the end": lambda h: h[_first(h)].update(data_offsets=[0, 10**9]),
    "overlapping offsets": lambda h: [h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]]) for k in h if k != "__metadata__"],
    "shape larger than the data": lambda h: h[_first(h)].update(shape=[10**6]),
    "unknown dtype": lambda h: h[_first(h)].update(dtype="Q99"),
    "negative shape": lambda h: h[_first(h)].update(shape=[-1]),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_safetensors_headers_are_refused(previous, forgery):
    path, _ = previous
    _resign(path, _forged_header((path / WEIGHTS_NAME).read_bytes(), FORGERIES[forgery]))
    model = _Net()
    state = _state(model)
    with pytest.raises(ValueError, match=f"cannot read {WEIGHTS_NAME}: Error while deserializing"):
        goft.load_adapter(model, str(path))
    _assert_same(model, state)


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles(previous, monkeypatch, tmp_path_factory):
    path, expected = previous
    marker = tmp_path_factory.mktemp("marker") / "code-ran"
    payload = pickle.dumps(_Payload(str(marker)))
    # The usual names of pickled checkpoints, planted next to the adapter.
    for name in ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "training_args.bin"):
        (path / name).write_bytes(payload)

    def refuse(*args, **kwargs):
        raise AssertionError("goft.load_adapter unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _loads_previous(path, expected)
    assert not marker.exists()

    # The tensors file itself replaced by a pickle (checksum made to match): refused, not run.
    _resign(path, payload)
    model = _Net()
    state = _state(model)
    with pytest.raises(ValueError, match=f"cannot read {WEIGHTS_NAME}"):
        goft.load_adapter(model, str(path))
    _assert_same(model, state)
    # And a torch.save file (a zip of pickles) in its place.
    import io as _io

    buffer = _io.BytesIO()
    monkeypatch.undo()
    torch.save({"up.goft_angles": _Payload(str(marker))}, buffer)
    _resign(path, buffer.getvalue())
    with pytest.raises(ValueError, match=f"cannot read {WEIGHTS_NAME}"):
        goft.load_adapter(model, str(path))
    _assert_same(model, state)
    assert not marker.exists()


def test_a_refused_load_into_an_injected_model_changes_nothing(previous):
    # Validation happens before the model is touched even when the model already has adapters
    # and a trainable head (test_io.py checks a plain model for its own tampering cases).
    path, _ = previous
    data = (path / WEIGHTS_NAME).read_bytes()
    tensors = safetensors.torch.load(data)
    tensors["head.weight"] = tensors["head.weight"][:1]  # wrong head shape for this model
    _resign(path, safetensors.torch.save(tensors))
    description = json.loads((path / CONFIG_NAME).read_text())
    description["tensors"]["head.weight"]["shape"] = [1, 12]
    (path / CONFIG_NAME).write_text(json.dumps(description))
    torch.manual_seed(0)
    adapting_up = _Net()  # an adapter of its own on one of the file's layers, the head not saved
    goft.inject(adapting_up, target_modules=["up"])
    # A model whose adapter saves the head too is refused for that first (one head per model).
    for model, message in ((adapting_up, r"modules_to_save entry head.weight is torch.float32 \(2, 12\) in the model"),
                           (_adapted(3), r"modules_to_save \['head'\] are also saved by adapter 'default'")):
        state = _state(model)
        grads = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match=message):
            goft.load_adapter(model, str(path), adapter_name="other")
        _assert_same(model, state)
        assert [p.requires_grad for p in model.parameters()] == grads and goft.active_adapter(model) == "default"
