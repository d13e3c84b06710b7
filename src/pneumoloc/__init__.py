"""pneumoloc: weakly supervised pneumonia detection and localisation on chest X-rays.

Research use only. pneumoloc is not a medical device and its outputs are not a diagnosis.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Research use only: pneumoloc is not a medical device and its outputs are not a diagnosis."
)
