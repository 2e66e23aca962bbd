# Run from a source checkout (python -m bench.<script>), this folder comes before the installed package on sys.path,
# but only the installed one holds the generated interfaces (msg, srv, action): submodules missing here are looked
# for there too.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
