"""Print the README's quick-start commands so CI runs exactly what a user copies.

`python .ci/readme_commands.py install` prints the first ```bash block of README.md (install + main job),
`python .ci/readme_commands.py test` the second (the test command).  Fails loudly if the README changed shape.
"""

import re
import sys
from pathlib import Path

blocks = re.findall(r"```bash\n(.*?)```", Path(__file__).resolve().parents[1].joinpath("README.md").read_text(), re.S)
which = {"install": 0, "test": 1}[sys.argv[1]]
if len(blocks) <= which or not blocks[which].strip():
    sys.exit(f"README.md: bash block {which + 1} (the {sys.argv[1]} command) not found")
print(blocks[which].strip())
