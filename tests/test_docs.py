"""The docs are tested with the code (docs/about.md says how): every
```python block of README.md and of the pages under docs/ runs, page by
page, with training shortened by one rule (`epochs=N` becomes `epochs=1`);
and the Sphinx site builds with warnings as errors."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md")
                                   if "_build" not in p.parts)]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHORTEN = (re.compile(r"\bepochs=\d+"), "epochs=1")


def python_blocks(page: pathlib.Path) -> list[str]:
  return BLOCK.findall(page.read_text())


def shortened(code: str) -> str:
  pattern, replacement = SHORTEN
  return pattern.sub(replacement, code)


RUNNABLE = [p for p in PAGES if python_blocks(p)
            and "notebooks" not in p.parts]


def test_shortening_touches_only_epoch_counts():
  code = 'fit(m, tx, ds, epochs=25, batch_size=32)\nsweep(epochs=20, halving_every=5)\n"--epochs 3"'
  assert shortened(code) == ('fit(m, tx, ds, epochs=1, batch_size=32)\n'
                             'sweep(epochs=1, halving_every=5)\n"--epochs 3"')


@pytest.mark.parametrize("page", RUNNABLE,
                         ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
  import matplotlib
  matplotlib.use("Agg")
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__docs__"}
  for i, code in enumerate(python_blocks(page)):
    try:
      exec(compile(shortened(code), f"{page.name}[block {i}]", "exec"),
           namespace)
    except Exception as e:
      raise AssertionError(f"{page.relative_to(ROOT)}, python block {i} "
                           f"failed: {type(e).__name__}: {e}") from e


def test_the_docs_site_builds_without_warnings(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q",
       "-b", "html", str(ROOT / "docs"), str(tmp_path / "html")],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "html" / "guides" / "compression.html").is_file()
  assert (tmp_path / "html" / "api.html").read_text().count(
      'id="jaxaccel.train.fit"') == 1
