# Copyright (C) 2025 The Cooper Developers.
# Licensed under the MIT License.
