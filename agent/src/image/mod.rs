//! Image store (owned by the image-store work).
