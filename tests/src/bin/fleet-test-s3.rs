//! The S3-compatible server the tests publish to and hosts poll: `s3s-fs` (a real S3 protocol
//! implementation over a directory, SigV4 authentication included) with two additions.
//!
//! - Conditional GETs: `s3s-fs` answers every GetObject in full; S3 itself (and MinIO, R2,
//!   Garage) answers `If-None-Match` with the current ETag `304 Not Modified`, which is what an
//!   idle host relies on. This server does the same.
//! - A switch to refuse uploads: while the file given by `--refuse` exists, each PutObject whose
//!   key is one of its lines (or starts with a line ending in `/`) is refused with
//!   AccessDenied, as a bucket policy would.
//!
//! Every request that reaches an object is logged to `--log` as `<operation> <key> <status>`,
//! so tests can assert what hosts and `fleet-sign` asked for.
//!
//! Usage: fleet-test-s3 --root DIR --access-key K --secret-key S --log FILE [--refuse FILE];
//! prints `listening <addr>` once it accepts connections on a free loopback port.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;

struct Server {
    inner: s3s_fs::FileSystem,
    log: Mutex<std::fs::File>,
    refuse: Option<PathBuf>,
}

impl Server {
    fn log(&self, operation: &str, key: &str, status: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(log, "{operation} {key} {status}");
    }

    fn refused(&self, key: &str) -> bool {
        let Some(path) = &self.refuse else {
            return false;
        };
        std::fs::read_to_string(path)
            .map(|text| {
                text.lines()
                    .any(|line| key == line || (line.ends_with('/') && key.starts_with(line)))
            })
            .unwrap_or(false)
    }

    /// Logs a result's status and passes it on.
    fn logged<T>(&self, operation: &str, key: &str, result: S3Result<T>) -> S3Result<T> {
        let status = match &result {
            Ok(_) => "200".to_owned(),
            Err(e) => e
                .status_code()
                .map_or("error".into(), |s| s.as_u16().to_string()),
        };
        self.log(operation, key, &status);
        result
    }
}

#[async_trait::async_trait]
impl S3 for Server {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.inner.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let key = req.input.key.clone();
        let condition = req.input.if_none_match.clone();
        let result = self.inner.get_object(req).await;
        let unchanged = match (&result, &condition) {
            (Ok(found), Some(ETagCondition::ETag(wanted))) => found
                .output
                .e_tag
                .as_ref()
                .is_some_and(|etag| etag.weak_cmp(wanted)),
            (Ok(_), Some(ETagCondition::Any)) => true,
            _ => false,
        };
        let result = match unchanged {
            true => Err(s3_error!(NotModified)),
            false => result,
        };
        self.logged("GET", &key, result)
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let key = req.input.key.clone();
        let result = self.inner.head_object(req).await;
        self.logged("HEAD", &key, result)
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let key = req.input.key.clone();
        let result = match self.refused(&key) {
            true => Err(s3_error!(AccessDenied, "uploads to this key are refused")),
            false => self.inner.put_object(req).await,
        };
        self.logged("PUT", &key, result)
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let key = req.input.key.clone();
        let result = self.inner.delete_object(req).await;
        self.logged("DELETE", &key, result)
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let result = self.inner.delete_objects(req).await;
        self.logged("DELETE-MANY", "-", result)
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let result = self.inner.list_objects_v2(req).await;
        self.logged("LIST", &prefix, result)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut root, mut access, mut secret, mut log, mut refuse) = (None, None, None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value)),
            "--access-key" => access = Some(value),
            "--secret-key" => secret = Some(value),
            "--log" => log = Some(PathBuf::from(value)),
            "--refuse" => refuse = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let (Some(root), Some(access), Some(secret), Some(log)) = (root, access, secret, log) else {
        return Err("--root, --access-key, --secret-key and --log are required".into());
    };
    let server = Server {
        inner: s3s_fs::FileSystem::new(&root).map_err(|e| format!("{}: {e:?}", root.display()))?,
        log: Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        ),
        refuse,
    };
    let mut builder = s3s::service::S3ServiceBuilder::new(server);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(access, secret));
    let service = builder.build();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            println!("listening {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let (socket, _) = listener.accept().await?;
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        })
}
