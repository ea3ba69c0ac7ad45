"""Run the capture fuzz corpus through a sanitizer build of the C walk (see test_sanitizer.py).

    python -m tests.fuzz.sanitized_run SO_PATH CASES SEED

Loads SO_PATH as `agent.sources.capfile._walk` before the reader imports it, then checks every case on the
C and Python paths. Exit 0 when all agree; 1 on a disagreement; the sanitizers abort on their own.
"""

import importlib.machinery
import importlib.util
import random
import sys
import tempfile
from pathlib import Path


def load_as(name: str, so: str):
    """Load the extension module at `so` as module `name`, before anything imports the built one."""
    loader = importlib.machinery.ExtensionFileLoader(name, so)
    spec = importlib.util.spec_from_loader(name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


def main(so: str, cases: int, seed: int) -> int:
    mod = load_as("agent.sources.capfile._walk", so)
    from agent.sources.capfile import walk as pcap_mod
    from tests.fuzz.corpus import mutate, records, seeds
    from tests.fuzz.test_capture_fuzz import all_paths

    assert pcap_mod._c_walk is mod.walk_pcap, "the sanitizer build was not the one loaded"
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = seeds(tmp)
        names = sorted(corpus)
        todo = [corpus[n] for n in names]
        for data in list(todo):
            todo.extend(data[:cut] for cut in records(data)[2])
        todo.extend(mutate(corpus[rnd.choice(names)], rnd) for _ in range(cases))
        path = tmp / "case.bin"
        for i, data in enumerate(todo):
            path.write_bytes(data)
            got = all_paths(str(path))
            parts_differ = got.get("c parts") != got.get("python parts")  # how idle gaps cut each 5-tuple
            if got["c"] != got["python"] or got["c"] != got["reference"] or parts_differ:
                (tmp.parent / f"sanitizer-disagree-{seed}-{i}.bin").write_bytes(data)
                print(f"case {i}: paths disagree", file=sys.stderr)
                return 1
    print(f"sanitized C walk: {len(todo)} cases, all paths agree")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
