"""The loss-accounting arithmetic (agent.accounting), without a kernel."""

from agent.accounting import LossAccount


def test_counter_growth_and_reset():
    a = LossAccount()
    assert a.kernel_reading(1000) == 0  # the baseline
    assert a.kernel_reading(1010) == 10
    assert a.kernel_reading(3) == 0  # the table was reloaded: rebase, keep the total
    assert a.kernel == 10
    assert a.kernel_reading(8) == 5 and a.kernel == 15
    assert a.kernel_reading(None) == 0


def test_unaccounted_is_the_gap_without_a_kernel_loss():
    a = LossAccount()
    a.kernel_reading(0)
    a.kernel_reading(100)
    a.arrived = 90
    for _ in range(3):
        assert a.settle() == 0
    assert a.unaccounted == 10  # nobody said events were lost: it stays visible


def test_overflow_is_booked_once_the_gap_is_stable_and_capped_by_the_kernels_loss():
    a = LossAccount()
    a.kernel_reading(0)
    a.kernel_reading(1000)
    a.arrived, a.recovered = 700, 100
    a.events_lost(150)
    assert a.settle() == 0  # the resync has not run yet
    a.resync_pending = False
    assert a.settle() == 0  # first look at the gap
    assert a.settle() == 150  # stable: booked, capped at what the kernel said it lost
    assert a.overflow == 150 and a.unaccounted == 50
    assert a.settle() == 0


def test_everything_recovered_books_nothing():
    a = LossAccount()
    a.kernel_reading(0)
    a.kernel_reading(500)
    a.arrived, a.recovered = 400, 100
    a.events_lost(120)
    a.resync_pending = False
    assert a.settle() == 0 and a.settle() == 0
    assert a.unaccounted == 0 and a.overflow == 0
