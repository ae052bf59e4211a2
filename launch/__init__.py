"""The disttrain launcher: `python -m launch -n WORKERS [-s SERVERS] -- COMMAND...` starts
the scheduler, the servers and the workers locally, over ssh or under Slurm."""
