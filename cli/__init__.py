"""Command-line front end (installed as the ``stunturn_cli`` package): parse, call, print."""
