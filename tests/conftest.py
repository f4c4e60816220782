import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (subprocess runs, torchrun, "
                                       "signals, torch.compile); skip with -m 'not slow'")
