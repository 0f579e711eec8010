//! Images a job starts from (`init_image`): how a request names one, where it is stored, and
//! what kiln checks of it before accepting the job.
//!
//! A client uploads an image through a link from `POST /v1/uploads` (`"kind": "image"`), which
//! stores it at `images/<tenant>/<image id>` (`img_<ULID>.png` or `.jpg`), and names the id in
//! the job. A job spec in the S3 inbox may also name a file beside it (`"init_image":
//! "photo.png"` read at `inbox/<tenant>/<name>/photo.png`), uploaded before the spec. Either way
//! the key is made from the tenant the request is authenticated as, so no tenant can read
//! another's image.
//!
//! Before a job is accepted its image is read whole: it must decode completely as PNG or JPEG
//! (so a truncated file is refused), weigh at most [`MAX_IMAGE_BYTES`] and measure between
//! [`MIN_IMAGE_SIDE`] and [`MAX_IMAGE_SIDE`] pixels a side. The job records the image's SHA-256,
//! which the cache key includes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{InputError, TenantId};

/// Largest image file a job may start from.
pub const MAX_IMAGE_BYTES: u64 = 20 * 1024 * 1024;
/// Smallest and largest side of an input image, in pixels.
pub const MIN_IMAGE_SIDE: u32 = 8;
pub const MAX_IMAGE_SIDE: u32 = 4096;
/// How much of an init image's structure is replaced when a request does not say (diffusers'
/// default for image-to-image).
pub const DEFAULT_STRENGTH: f64 = 0.8;

const FIELD: &str = "init_image";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Png,
    Jpeg,
}

impl ImageFormat {
    /// The upload content types kiln takes, and the file extension each is stored under.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type {
            "image/png" => Some(Self::Png),
            "image/jpeg" => Some(Self::Jpeg),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
        }
    }
}

/// An input image as a job records it: where it is, its hash and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InitImage {
    /// The object's key in the artifacts bucket.
    pub key: String,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub format: ImageFormat,
}

/// How a request names its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageReference {
    /// An image uploaded through `POST /v1/uploads`: its id, `img_<ULID>.<png|jpg>`.
    Uploaded(String),
    /// A file beside an inbox spec (inbox specs only).
    Beside(String),
}

impl ImageReference {
    pub fn parse(text: &str) -> Result<Self, InputError> {
        if let Some(rest) = text.strip_prefix("img_") {
            let (id, extension) = rest.split_once('.').unwrap_or((rest, ""));
            let id_ok = ulid::Ulid::from_string(id).is_ok_and(|ulid| ulid.to_string() == id);
            if !id_ok || !matches!(extension, "png" | "jpg") {
                return Err(InputError::invalid(FIELD, "not an image id from POST /v1/uploads (img_<id>.png or .jpg)"));
            }
            return Ok(Self::Uploaded(text.to_owned()));
        }
        let name_ok = !text.is_empty()
            && text.len() <= 128
            && !text.starts_with('.')
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        let lower = text.to_ascii_lowercase();
        if !name_ok || ![".png", ".jpg", ".jpeg"].iter().any(|ext| lower.ends_with(ext)) {
            return Err(InputError::invalid(
                FIELD,
                "must be an image id from POST /v1/uploads (img_<id>.png), or in an inbox spec the name of a .png or .jpg file beside it",
            ));
        }
        Ok(Self::Beside(text.to_owned()))
    }

    /// The object's key for `tenant`. `inbox_folder` is the folder of the inbox spec naming it
    /// (`inbox/<tenant>/<name>/`), None through the API.
    pub fn key(&self, tenant: &TenantId, inbox_folder: Option<&str>) -> Result<String, InputError> {
        match (self, inbox_folder) {
            (Self::Uploaded(id), _) => Ok(uploaded_key(tenant, id)),
            (Self::Beside(file), Some(folder)) => Ok(format!("{folder}{file}")),
            (Self::Beside(_), None) => Err(InputError::invalid(
                FIELD,
                "a file name is read beside an inbox spec; through the API, upload the image with POST /v1/uploads and name its id",
            )),
        }
    }
}

/// Where an uploaded image is stored.
pub fn uploaded_key(tenant: &TenantId, id: &str) -> String {
    format!("images/{tenant}/{id}")
}

/// A fresh image id for an upload of `format`.
pub fn new_image_id(format: ImageFormat, now: chrono::DateTime<chrono::Utc>) -> String {
    let ulid = ulid::Ulid::from_parts(now.timestamp_millis().max(0) as u64, rand::random());
    format!("img_{ulid}.{}", format.extension())
}

/// Reads `bytes` as an input image stored at `key`: decodes it whole (a truncated or corrupt
/// file is refused, as is anything but PNG and JPEG) and checks its size.
pub fn inspect(key: &str, bytes: &[u8]) -> Result<InitImage, InputError> {
    if bytes.len() as u64 > MAX_IMAGE_BYTES {
        return Err(InputError::invalid(FIELD, format!("the image is larger than {MAX_IMAGE_BYTES} bytes")));
    }
    let format = match image::guess_format(bytes) {
        Ok(image::ImageFormat::Png) => ImageFormat::Png,
        Ok(image::ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Ok(other) => {
            return Err(InputError::invalid(FIELD, format!("a {other:?} image; kiln reads PNG and JPEG")));
        }
        Err(_) => return Err(InputError::invalid(FIELD, "not a PNG or JPEG image")),
    };
    let reader = image::ImageReader::with_format(
        std::io::Cursor::new(bytes),
        match format {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        },
    );
    let (width, height) = reader
        .into_dimensions()
        .map_err(|err| InputError::invalid(FIELD, format!("the image's header does not read: {err}")))?;
    for (side, value) in [("width", width), ("height", height)] {
        if !(MIN_IMAGE_SIDE..=MAX_IMAGE_SIDE).contains(&value) {
            return Err(InputError::invalid(
                FIELD,
                format!("the image's {side} is {value} pixels; it must be {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}"),
            ));
        }
    }
    // The whole file, so a truncated one is refused now, not when its job runs.
    image::load_from_memory_with_format(
        bytes,
        match format {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        },
    )
    .map_err(|err| InputError::invalid(FIELD, format!("the image does not decode: {err}")))?;
    Ok(InitImage { key: key.to_owned(), sha256: hex::encode(Sha256::digest(bytes)), width, height, format })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A PNG of `width`×`height` with a gradient.
    pub fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 2) as u8, 40]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn good_images_are_measured_and_hashed() {
        let read = inspect("images/acme/img_x.png", &png(64, 40)).unwrap();
        assert_eq!((read.width, read.height, read.format), (64, 40, ImageFormat::Png));
        assert_eq!(read.sha256.len(), 64);
        let read = inspect("k", &jpeg(30, 90)).unwrap();
        assert_eq!((read.width, read.height, read.format), (30, 90, ImageFormat::Jpeg));
        assert_ne!(inspect("k", &png(64, 41)).unwrap().sha256, inspect("k", &png(64, 40)).unwrap().sha256);
    }

    #[test]
    fn bad_images_are_refused_naming_the_field() {
        let whole = png(64, 64);
        let truncated = &whole[..whole.len() - 20];
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("not an image", b"{\"prompt\": \"hello\"}".to_vec(), "not a PNG or JPEG"),
            ("truncated", truncated.to_vec(), "does not decode"),
            ("a gif", gif, "kiln reads PNG and JPEG"),
            ("too small", png(4, 64), "width is 4 pixels"),
            ("too large", vec![0u8; MAX_IMAGE_BYTES as usize + 1], "larger than"),
        ];
        for (what, bytes, says) in cases {
            let err = inspect("k", &bytes).expect_err(what);
            assert_eq!(err.field.as_deref(), Some("init_image"), "{what}");
            assert!(err.message.contains(says), "{what}: {}", err.message);
        }
    }

    #[test]
    fn references_resolve_inside_the_tenant() {
        let tenant = TenantId::parse("acme").unwrap();
        let id = new_image_id(ImageFormat::Png, chrono::Utc::now());
        let uploaded = ImageReference::parse(&id).unwrap();
        assert_eq!(uploaded.key(&tenant, None).unwrap(), format!("images/acme/{id}"));
        assert_eq!(uploaded.key(&tenant, Some("inbox/acme/a/")).unwrap(), format!("images/acme/{id}"));
        let beside = ImageReference::parse("photo.PNG").unwrap();
        assert_eq!(beside.key(&tenant, Some("inbox/acme/batch-1/")).unwrap(), "inbox/acme/batch-1/photo.PNG");
        assert_eq!(beside.key(&tenant, None).unwrap_err().field.as_deref(), Some("init_image"));
        for bad in ["../other/img.png", "img_nope.png", "photo.gif", "", ".png", "a/b.png", &id.replace(".png", ".gif")]
        {
            assert_eq!(ImageReference::parse(bad).unwrap_err().field.as_deref(), Some("init_image"), "{bad}");
        }
    }
}
