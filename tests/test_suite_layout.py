"""The suite's layout: test modules share fixtures and helpers through conftest.py only, never by importing
one another (a test module imported by another would also have its tests collected twice over)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# from tests.test_x import ..., from .test_x import ..., from tests import test_x, import tests.test_x,
# from test_x import ..., import test_x
CROSS_IMPORT = re.compile(
    r"^\s*(?:from\s+(?:tests)?\.*test_\w*\s+import|from\s+(?:tests|\.)\s+import\s+[^#\n]*\btest_|"
    r"import\s+(?:tests\.)?test_)",
    re.MULTILINE,
)


def test_the_pattern_finds_every_form_of_import() -> None:
    for line in (
        "from tests.test_config import composed",
        "    from tests.test_config import CONF",
        "from .test_data import write",
        "from tests import conftest, test_data",
        "import tests.test_mrc_linear",
        "from test_config import composed",
        "import test_config",
    ):
        assert CROSS_IMPORT.search(line), line
    for line in ("from tests.conftest import composed", "from rift_bn.pipeline import test_eval", "x = 1"):
        assert not CROSS_IMPORT.search(line), line


def test_no_test_module_imports_another() -> None:
    modules = sorted(TESTS.glob("*.py"))
    assert len(modules) > 10 and TESTS / "conftest.py" in modules
    found = []
    for path in modules:
        text = path.read_text()
        for m in CROSS_IMPORT.finditer(text):
            found.append(f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}")
    assert found == [], "import shared helpers from tests/conftest.py instead:\n" + "\n".join(found)
