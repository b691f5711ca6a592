"""One module per `reformer-dist` subcommand (see reformer_dist.cli)."""
