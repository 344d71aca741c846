"""The Minitron recipe: one module per stage (recipes/<stage>.py), shared code in recipes/lib/."""
from recipes.lib import quiet as _quiet

_quiet.install_warning_filters()  # expected upstream warnings, each with its reason
