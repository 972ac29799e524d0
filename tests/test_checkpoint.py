import torch

from ensiam_fast.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state(step):
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "config": {}, "model": {"w": torch.full((2,), step)}}


def test_save_prunes_and_latest_picks_newest(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, _state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000015.pt", "step-00000020.pt"]
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 20 and path.name == "step-00000020.pt"
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_damaged_newest_is_skipped_with_warning(tmp_path, recwarn):
    save_checkpoint(tmp_path, _state(1))
    newest = save_checkpoint(tmp_path, _state(2))
    newest.write_bytes(newest.read_bytes()[:100])  # truncated mid-write by a crash
    path, state = latest_checkpoint(tmp_path)
    assert state["step"] == 1
    assert any("damaged" in str(w.message) for w in recwarn.list)


def test_missing_run_says_what_to_do(tmp_path):
    try:
        resolve_checkpoint(run=tmp_path)
    except CheckpointError as e:
        assert "no readable checkpoint" in str(e) and "train first" in str(e)
    else:
        raise AssertionError("expected CheckpointError")


def test_rng_round_trip():
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
