# setup.py exists for the cffi build hook: the C kernels are compiled at install time
# (`pip install .` or `pip install -e .`) into edgellm.native._kernels.
from setuptools import setup

setup(cffi_modules=["edgellm/native/build.py:ffibuilder"])
