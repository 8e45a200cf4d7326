"""``python -m autoqra.evaluators.tasks``: regenerate the committed task files (:func:`.build.generate`)."""

import logging

from autoqra.evaluators.tasks.build import generate

logging.basicConfig(level=logging.INFO)
generate()
