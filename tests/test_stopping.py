"""The one signal scope (ensiam_fast/stopping.py), at function level: abortable phases end at once,
deferred ones set a flag, a second signal stops at once, the handlers are restored afterwards."""

import os
import signal

import pytest

from ensiam_fast.stopping import Interrupted, StopRequest


def kill_self(sig=signal.SIGTERM):
    os.kill(os.getpid(), sig)


def test_the_start_phase_is_abortable_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="stopped by SIGTERM during the start checks") as e:
        with StopRequest():
            kill_self()
            raise AssertionError("the handler should have raised")
    assert e.value.signum == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_deferred_phase_runs_to_its_end_then_the_flag_stops_the_run():
    with StopRequest() as stop:
        with stop.deferred():
            kill_self(signal.SIGINT)
            finished = True  # reached: the signal only set the flag
        assert finished and stop.signum == signal.SIGINT
        with pytest.raises(Interrupted, match="stopped by SIGINT after the write"):
            stop.raise_if_signalled("after the write")


def test_an_abortable_phase_inside_a_deferred_one_ends_at_once():
    with StopRequest() as stop, stop.deferred():
        with pytest.raises(Interrupted, match="during the final kNN"):
            with stop.abortable("during the final kNN"):
                kill_self()
                raise AssertionError("the handler should have raised")


def test_a_signal_before_an_abortable_phase_stops_it_before_it_starts():
    with StopRequest() as stop, stop.deferred():
        kill_self()
        with pytest.raises(Interrupted, match="during the kNN"):
            with stop.abortable("during the kNN"):
                raise AssertionError("an abortable phase must not start after a signal")


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop, stop.deferred():
        kill_self()
        # the second signal ends the run at once with its own exit code (128 + N), not a KeyboardInterrupt
        with pytest.raises(Interrupted, match="a second time") as e:
            kill_self()
    assert e.value.signum == signal.SIGTERM
