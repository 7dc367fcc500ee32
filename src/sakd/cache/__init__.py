"""The teacher cache: the teacher's top-k next-token distributions computed once, keyed by character offsets
so that students with any tokenizer can train from it without running the teacher."""

from sakd.cache.capture import cache_path, capture_teacher_cache
from sakd.cache.store import TeacherCache
from sakd.cache.training import CachedTeacher, open_training_cache, teacher_skeleton

__all__ = [
    "CachedTeacher",
    "TeacherCache",
    "cache_path",
    "capture_teacher_cache",
    "open_training_cache",
    "teacher_skeleton",
]
