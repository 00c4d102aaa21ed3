"""`ctrl-data`: the command-line front of ctrl_offline's pipeline stages."""
