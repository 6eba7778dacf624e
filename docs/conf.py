"""Sphinx configuration of the jaxaccel docs: MyST Markdown pages, the
notebooks rendered with their saved outputs (they are executed by the test
suite, not here), and an API reference from the docstrings."""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

project = "jaxaccel"
author = "the jaxaccel developers"
copyright = "2026, the jaxaccel developers"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.viewcode"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"
html_theme = "furo"
html_title = "jaxaccel"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
nitpicky = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The notebooks live in notebooks/ at the top of the repository (where the
# test suite runs them); Sphinx reads pages only under docs/, so they are
# copied in at each build.
_NOTEBOOKS = pathlib.Path(__file__).parent / "notebooks"
shutil.rmtree(_NOTEBOOKS, ignore_errors=True)
_NOTEBOOKS.mkdir()
for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copy(nb, _NOTEBOOKS / nb.name)
