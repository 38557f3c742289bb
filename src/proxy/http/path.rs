//! Request path normalization (filled in by the HTTP mode work).
