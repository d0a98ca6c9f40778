//! redb-backed store. (in progress)
