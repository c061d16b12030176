//! Test harness for mcpage's end-to-end tests (work in progress).
