"""swin_dense: a Swin Transformer backbone for mmdet 3.x and mmsegmentation 1.x.

Install the whole stack with ``bash tools/setup_env.sh`` (see README.md); this file installs the
package itself.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r"__version__ = '([^']+)'",
                    Path(__file__).with_name('swin_dense').joinpath('__init__.py').read_text())[1]

setup(
    name='swin_dense',
    version=version,
    description='Swin Transformer backbone for dense prediction with mmdet and mmsegmentation',
    long_description=Path(__file__).with_name('README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['swin_dense', 'swin_dense.*']),
    python_requires='>=3.9',
    # torch and mmcv are left to tools/setup_env.sh: a plain `torch` requirement would pull a
    # multi-GB CUDA build over an existing torch, and mmcv with ops has no wheel.
    install_requires=['mmengine>=0.10.0,<1.0', 'numpy', 'Pillow'],
    license='Apache-2.0',
)
