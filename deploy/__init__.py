"""The composition root: profiles, the launcher and the command line, and deployment files
(compose, Kubernetes, Dockerfile); it turns a profile and settings into running processes.
"""

from toposerve.deploy.cli import main
from toposerve.deploy.components import build_app, build_stage_runner, load_checked_profile
from toposerve.deploy.profile import Profile, ProfileError, available_profiles, load_profile

__all__ = [
    "Profile",
    "ProfileError",
    "available_profiles",
    "build_app",
    "build_stage_runner",
    "load_checked_profile",
    "load_profile",
    "main",
]
