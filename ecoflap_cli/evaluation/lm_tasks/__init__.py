"""lm-evaluation-harness tasks shipped with ecoflap: YAML configs (package data) and the
functions they name with ``!function``. ``ecoflap eval --tasks NAME`` finds them; plain lm-eval
does too with ``--include_path`` set to this folder."""
