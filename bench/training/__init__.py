"""The training toolbox used by defenses and models: the shared loop, recipes, checkpoints.

Below the plugins: nothing here imports a defense, an attack, a certifier or the harness.
"""
