import gc

from memplan.heap import frozen, paused


def test_frozen_freezes_the_heap_until_the_end():
    assert gc.get_freeze_count() == 0
    alive = [[] for _ in range(1000)]
    with frozen():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0


def test_a_heap_the_caller_froze_is_left_as_it_is():
    """Asked object by object (a collection walks no frozen object): the freeze count also
    falls when another thread frees a frozen object meanwhile."""
    def collected() -> set[int]:
        return {id(o) for o in gc.get_objects()}

    frozen_by_caller = []
    gc.freeze()
    try:
        with frozen():
            made_inside = []
            assert id(made_inside) in collected(), "frozen again"
            assert id(frozen_by_caller) not in collected()
        assert id(frozen_by_caller) not in collected(), "unfrozen"
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
