import gc

from memplan.heap import frozen, paused


def test_frozen_freezes_the_heap_until_the_end():
    assert gc.get_freeze_count() == 0
    alive = [[] for _ in range(1000)]
    with frozen():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0


def test_a_heap_the_caller_froze_is_left_as_it_is():
    gc.freeze()
    try:
        frozen_by_caller = gc.get_freeze_count()
        with frozen():
            made_inside = [[] for _ in range(1000)]
            assert gc.get_freeze_count() == frozen_by_caller
        assert gc.get_freeze_count() == frozen_by_caller
        del made_inside
    finally:
        gc.unfreeze()


def test_paused_collects_nothing_and_restores_the_collector():
    collections = []
    callback = lambda phase, info: collections.append(phase)  # noqa: E731
    gc.callbacks.append(callback)
    try:
        with paused():
            assert not gc.isenabled()
            for _ in range(100_000):  # far past the first generation's threshold
                cycle = []
                cycle.append(cycle)
            assert not collections
        assert gc.isenabled()
        gc.disable()
        with paused():
            pass
        assert not gc.isenabled()  # the caller's setting
    finally:
        gc.enable()
        gc.callbacks.remove(callback)
