"""The run configs (YAML), installed as the package ``reformer_dist.configs`` so that bare ``--config`` names
resolve in any installation. Nothing to import: ``reformer_dist.config_files`` finds and reads the files."""
