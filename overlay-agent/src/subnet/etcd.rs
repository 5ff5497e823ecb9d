//! The registry on etcd's v3 API: flannel's network config, its subnet records, and a watch
//! over them.
use std::{fs, time::Duration};

use anyhow::{Context, Result, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KvClient, PutOptions, TlsOptions, Txn, TxnOp, WatchClient, WatchOptions, WatchStream,
};

use super::{
    LeaseAttrs, LeaseSubnets, PublicAddresses, Record, fits_a_record,
    pages::{Entry, Page, PageError, RangeReader, Values, list_in_pages},
    registry::{ConfigReadError, Listing, RecordChange, Registry, Release, Watch, WatchUpdate},
    subnet_key, subnets_prefix,
};
use crate::config::NetworkConfig;

/// How to reach etcd, as flanneld's `--etcd-*` flags describe it.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: Option<String>,
    pub certfile: Option<String>,
    pub cafile: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    /// Reads (records, config) and the watch, each receiving up to [`MAX_RESPONSE_BYTES`].
    kv: KvClient,
    watcher: WatchClient,
    prefix: String,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer the agent receives from etcd (the client's default is 4 MiB): ten
/// values of etcd's default request limit (1.5 MiB), the largest a record can be unless etcd
/// is configured otherwise. Listings come in pages that fit; a watch response that does not
/// is replaced by a listing.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// How often `release_if_owned` reads and tries to delete a record that keeps changing.
const RELEASE_ATTEMPTS: usize = 3;

impl EtcdRegistry {
    pub async fn connect(options: &EtcdOptions) -> Result<Self> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            // etcd's require-leader: a member cut off from the quorum refuses requests and
            // closes watches, so the agent moves to another member instead of hearing nothing.
            .with_require_leader(true);
        if let Some(tls) = tls_options(options)? {
            connect = connect.with_tls(tls);
        }
        match (&options.username, &options.password) {
            (Some(user), Some(password)) => {
                warn_about_plain_http(&options.endpoints);
                // Tokens expire (simple tokens after 5 idle minutes, every token when etcd
                // restarts): a request refused for its token logs in again and is retried.
                connect = connect
                    .with_user(user, password)
                    .with_auto_token_refresh(true);
            }
            (Some(_), None) | (None, Some(_)) => {
                bail!("--etcd-username and --etcd-password go together: give both or neither")
            }
            (None, None) => {}
        }
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .with_context(|| {
                format!("cannot connect to etcd at {}", options.endpoints.join(","))
            })?;
        Ok(Self {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watcher: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            client,
            prefix: options.prefix.clone(),
        })
    }
    /// The etcd lease and revision of the record at `key` if it names `owner`.
    async fn owned_record(&self, key: &str, owner: PublicAddresses) -> Result<Option<(i64, i64)>> {
        let current = self
            .kv
            .clone()
            .get(key, None)
            .await
            .with_context(|| format!("cannot read {key}"))?;
        Ok(current.kvs().first().and_then(|kv| {
            serde_json::from_slice::<LeaseAttrs>(kv.value())
                .is_ok_and(|attrs| owner.named_in(&attrs))
                .then(|| (kv.lease(), kv.mod_revision()))
        }))
    }

    async fn grant(&self, ttl: Duration) -> Result<i64> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).context("lease TTL is too long")?;
        let response = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .context("cannot grant an etcd lease")?;
        Ok(response.id())
    }

    /// Runs `txn`, which `action`s `key` under a condition; whether the condition held.
    async fn commit(&self, txn: Txn, action: &str, key: &str) -> Result<bool> {
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .with_context(|| format!("cannot {action} {key}"))?;
        Ok(response.succeeded())
    }

    /// Best effort: an etcd lease nobody uses any more expires on its own anyway.
    async fn revoke(&self, etcd_lease: i64) {
        if let Err(error) = self.client.clone().lease_revoke(etcd_lease).await {
            log::debug!("cannot revoke unused etcd lease {etcd_lease:x}: {error}");
        }
    }
}

impl Registry for EtcdRegistry {
    type Watch = EtcdWatch;

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn network_config(&self) -> Result<NetworkConfig, ConfigReadError> {
        let key = format!("{}/config", self.prefix.trim_end_matches('/'));
        let response = self
            .kv
            .clone()
            .get(key.as_str(), None)
            .await
            .map_err(ConfigReadError::Etcd)?;
        let kv = response
            .kvs()
            .first()
            .ok_or(ConfigReadError::Missing(key))?;
        let json = String::from_utf8_lossy(kv.value());
        NetworkConfig::parse(&json).map_err(ConfigReadError::Invalid)
    }

    async fn list(&self) -> Result<Listing> {
        let mut reader = self.kv.clone();
        list_in_pages(&mut reader, &subnets_prefix(&self.prefix))
            .await
            .map_err(anyhow::Error::from)
            .context("cannot list the subnet records in etcd")
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<Option<i64>> {
        let key = subnet_key(&self.prefix, subnets);
        let etcd_lease = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(etcd_lease)),
            )]);
        if self.commit(txn, "create", &key).await? {
            return Ok(Some(etcd_lease));
        }
        self.revoke(etcd_lease).await;
        Ok(None)
    }

    async fn update(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        owner: PublicAddresses,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>> {
        let key = subnet_key(&self.prefix, subnets);
        let Some((old_lease, mod_revision)) = self.owned_record(&key, owner).await? else {
            return Ok(None);
        };
        let etcd_lease = match ttl {
            Some(ttl) => self.grant(ttl).await?,
            None => 0,
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::put(
                key.as_str(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(etcd_lease)),
            )]);
        if !self.commit(txn, "update", &key).await? {
            if etcd_lease != 0 {
                self.revoke(etcd_lease).await;
            }
            bail!("{key} changed while it was being updated");
        }
        if old_lease != 0 && old_lease != etcd_lease {
            self.revoke(old_lease).await;
        }
        Ok(Some(etcd_lease))
    }

    async fn release_if_owned(
        &self,
        subnets: LeaseSubnets,
        owner: PublicAddresses,
    ) -> Result<Release> {
        let key = subnet_key(&self.prefix, subnets);
        // A running agent renewing the record between the read and the delete makes the
        // delete's condition fail: read it again.
        for _ in 0..RELEASE_ATTEMPTS {
            let Some((etcd_lease, mod_revision)) = self.owned_record(&key, owner).await? else {
                return Ok(Release::NotOwned);
            };
            if etcd_lease == 0 {
                return Ok(Release::Reserved);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            if self.commit(txn, "delete", &key).await? {
                return Ok(Release::Deleted);
            }
        }
        bail!(
            "{key} changed under each of {RELEASE_ATTEMPTS} attempts to delete it: is an agent \
             still renewing it?"
        )
    }

    async fn delete(&self, subnets: LeaseSubnets) -> Result<()> {
        let key = subnet_key(&self.prefix, subnets);
        self.client
            .clone()
            .delete(key.as_str(), None)
            .await
            .with_context(|| format!("cannot delete {key}"))?;
        Ok(())
    }

    async fn watch(&self, revision: i64) -> Result<EtcdWatch> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        let stream = self
            .watcher
            .clone()
            .watch(subnets_prefix(&self.prefix), Some(options))
            .await
            .context("cannot watch the subnet records in etcd")?;
        Ok(EtcdWatch {
            stream,
            client: self.client.clone(),
        })
    }
}

/// Warns that the password will cross the network readable to anyone on the path.
fn warn_about_plain_http(endpoints: &[String]) {
    for endpoint in endpoints
        .iter()
        .filter(|endpoint| endpoint.starts_with("http://"))
    {
        log::warn!("the etcd password goes unencrypted to {endpoint}: use https");
    }
}

/// One etcd watch over the subnet records.
pub struct EtcdWatch {
    stream: WatchStream,
    /// To log in again when etcd refuses the watch for its token.
    client: Client,
}

impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<Option<WatchUpdate>> {
        let response = match self.stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(None),
            Err(error) if is_too_large(&error) => return Ok(Some(WatchUpdate::TooLarge)),
            Err(error) => return Err(error.into()),
        };
        if response.canceled() {
            if response.compact_revision() > 0 {
                return Ok(Some(WatchUpdate::Compacted));
            }
            let reason = response.cancel_reason();
            // The client logs in again only when a request fails; etcd accepts the watch
            // stream and refuses the token in its first response instead.
            if is_token_refusal(reason) {
                self.client
                    .refresh_token()
                    .await
                    .with_context(|| format!("etcd refused the watch ({reason}) and the login"))?;
                bail!("etcd refused the watch ({reason}); logged in again");
            }
            bail!("etcd canceled the watch: {reason}");
        }
        let changes = response
            .events()
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                Some(RecordChange {
                    record: Record {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        value: fits_a_record(kv.value()).then(|| kv.value().to_vec()),
                        etcd_lease: kv.lease(),
                        create_revision: kv.create_revision(),
                    },
                    deleted: event.event_type() == EventType::Delete,
                    revision: kv.mod_revision(),
                })
            })
            .collect();
        Ok(Some(WatchUpdate::Changes(changes)))
    }
}

impl RangeReader for KvClient {
    async fn read(
        &mut self,
        from: &[u8],
        end: &[u8],
        limit: i64,
        revision: i64,
        values: Values,
    ) -> Result<Page, PageError> {
        let mut options = GetOptions::new()
            .with_range(end)
            .with_limit(limit)
            .with_revision(revision);
        if values == Values::KeysOnly {
            options = options.with_keys_only();
        }
        let mut response = self.get(from, Some(options)).await.map_err(page_error)?;
        let entries = response
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (etcd_lease, create_revision) = (kv.lease(), kv.create_revision());
                let (key, value) = kv.into_key_value();
                Entry {
                    key,
                    value: (values == Values::Included).then_some(value),
                    etcd_lease,
                    create_revision,
                }
            })
            .collect();
        Ok(Page {
            entries,
            more: response.more(),
            revision: response.header().map_or(0, |header| header.revision()),
        })
    }
}

/// Tells the answers the listing works around from other failures. etcd's compaction error
/// and the client's size limit share a gRPC code (OUT_OF_RANGE) with others, such as a
/// revision in the future: only the message tells them apart.
fn page_error(error: etcd_client::Error) -> PageError {
    if is_too_large(&error) {
        return PageError::TooLarge;
    }
    match &error {
        etcd_client::Error::GRpcStatus(status)
            if status.code() == tonic::Code::OutOfRange
                && status
                    .message()
                    .contains("required revision has been compacted") =>
        {
            PageError::Compacted
        }
        _ => PageError::Other(error.into()),
    }
}

/// Whether etcd canceled a watch for the token it was opened with (expired, or forgotten in
/// a restart).
fn is_token_refusal(reason: &str) -> bool {
    reason.contains("invalid auth token")
}

/// Whether the client refused an answer larger than [`MAX_RESPONSE_BYTES`].
fn is_too_large(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::OutOfRange
            && status.message().contains("message length too large"))
}

fn tls_options(options: &EtcdOptions) -> Result<Option<TlsOptions>> {
    let read = |path: &str, what: &str| {
        fs::read(path).with_context(|| format!("cannot read the etcd {what} {path}"))
    };
    let mut tls = TlsOptions::new();
    let mut enabled = false;
    if let Some(cafile) = &options.cafile {
        tls = tls.ca_certificate(Certificate::from_pem(read(cafile, "CA file")?));
        enabled = true;
    }
    match (&options.certfile, &options.keyfile) {
        (Some(certfile), Some(keyfile)) => {
            tls = tls.identity(Identity::from_pem(
                read(certfile, "certificate file")?,
                read(keyfile, "key file")?,
            ));
            enabled = true;
        }
        (Some(_), None) | (None, Some(_)) => {
            bail!("--etcd-certfile and --etcd-keyfile go together: give both or neither")
        }
        (None, None) => {}
    }
    Ok(enabled.then_some(tls))
}
