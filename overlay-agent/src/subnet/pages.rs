//! Reading every record under a prefix in pages, all at the revision of the first, so the
//! listing is one consistent snapshot the watch can resume from however many records there
//! are. A page too large for the client to receive is asked for again at half the size; a
//! record too large on its own is listed by its key alone, without its value, and skipped by
//! the record rules, as is any value above a record's limit, dropped page by page.
use std::future::Future;

use anyhow::anyhow;

use super::{Record, fits_a_record, registry::Listing};

/// Records asked for in one page: well under the message limit for records of flannel's
/// size (about 120 bytes), few round trips for tens of thousands of them.
pub const PAGE_RECORDS: i64 = 1024;
/// How often a listing overtaken by a compaction starts again before it gives up.
const LISTING_ATTEMPTS: usize = 3;

/// One record as the store returns it, its key still in bytes: the next page starts after it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: Vec<u8>,
    /// `None` when only the key was asked for.
    pub value: Option<Vec<u8>>,
    pub etcd_lease: i64,
    pub create_revision: i64,
}

/// One page of a range read.
#[derive(Debug)]
pub struct Page {
    pub entries: Vec<Entry>,
    /// Whether the range holds records after these.
    pub more: bool,
    /// The store's revision when it answered.
    pub revision: i64,
}

/// Why a page could not be read.
#[derive(Debug)]
pub enum PageError {
    /// The answer exceeded the largest message the client receives.
    TooLarge,
    /// The revision asked for was compacted away while the listing ran.
    Compacted,
    Other(anyhow::Error),
}

impl From<PageError> for anyhow::Error {
    fn from(error: PageError) -> Self {
        match error {
            PageError::TooLarge => anyhow!("a single record key is too large to read"),
            PageError::Compacted => anyhow!(
                "etcd compacted the records {LISTING_ATTEMPTS} times while they were listed"
            ),
            PageError::Other(error) => error,
        }
    }
}

/// What a page asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    Included,
    KeysOnly,
}

/// A key range read in pages, as etcd's Range call reads it.
pub trait RangeReader: Send {
    /// Up to `limit` records with keys in `[from, end)`, in key order, at `revision` (0 for
    /// the newest).
    fn read(
        &mut self,
        from: &[u8],
        end: &[u8],
        limit: i64,
        revision: i64,
        values: Values,
    ) -> impl Future<Output = Result<Page, PageError>> + Send;
}

/// Every record under `prefix`, read in pages at one revision: the first page's. Starts again
/// from the newest revision when a compaction overtakes it.
pub async fn list_in_pages(
    reader: &mut impl RangeReader,
    prefix: &str,
) -> Result<Listing, PageError> {
    for _ in 1..LISTING_ATTEMPTS {
        match list_once(reader, prefix).await {
            Err(PageError::Compacted) => {
                log::info!("etcd compacted the records while they were listed; listing again");
            }
            outcome => return outcome,
        }
    }
    list_once(reader, prefix).await
}

async fn list_once(reader: &mut impl RangeReader, prefix: &str) -> Result<Listing, PageError> {
    let end = range_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    // 0 asks for the newest revision; the first answer pins the listing to its own.
    let mut revision = 0;
    let mut limit = PageLimit::default();
    let mut records = Vec::new();
    loop {
        let page = match reader
            .read(&from, &end, limit.get(), revision, Values::Included)
            .await
        {
            Ok(page) => {
                limit.grow();
                page
            }
            Err(PageError::TooLarge) if limit.shrink() => {
                log::debug!(
                    "a page of records was too large; asking for {}",
                    limit.get()
                );
                continue;
            }
            Err(PageError::TooLarge) => {
                reader
                    .read(&from, &end, 1, revision, Values::KeysOnly)
                    .await?
            }
            Err(error) => return Err(error),
        };
        if revision == 0 {
            revision = page.revision;
        }
        let Some(last) = page.entries.last() else {
            break;
        };
        from = key_after(&last.key);
        let more = page.more;
        records.extend(page.entries.into_iter().map(Entry::into_record));
        if !more {
            break;
        }
    }
    Ok(Listing { records, revision })
}

impl Entry {
    fn into_record(self) -> Record {
        Record {
            key: String::from_utf8_lossy(&self.key).into_owned(),
            value: self.value.filter(|value| fits_a_record(value)),
            etcd_lease: self.etcd_lease,
            create_revision: self.create_revision,
        }
    }
}

/// How many records the next page asks for: halved while pages are too large, doubled back
/// after each page that fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PageLimit(i64);

impl Default for PageLimit {
    fn default() -> Self {
        Self(PAGE_RECORDS)
    }
}

impl PageLimit {
    fn get(self) -> i64 {
        self.0
    }

    /// Halves the page; false when it is one record already.
    fn shrink(&mut self) -> bool {
        if self.0 == 1 {
            return false;
        }
        self.0 /= 2;
        true
    }

    fn grow(&mut self) {
        self.0 = (self.0 * 2).min(PAGE_RECORDS);
    }
}

/// The smallest key after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The end (exclusive) of the range of keys that start with `prefix`, as etcd computes it:
/// the prefix with its last byte below 0xff incremented and the rest cut; every key (`\0`)
/// when all its bytes are 0xff.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&byte| byte < 0xff) {
        Some(last) => {
            let mut end = prefix[..=last].to_vec();
            end[last] += 1;
            end
        }
        None => vec![0],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::subnet::MAX_RECORD_VALUE;

    const PREFIX: &str = "/docker-test/network/subnets/";

    /// A store of keys and values, answering like etcd's Range with a client that refuses
    /// answers larger than `max_answer` bytes (counting keys and values).
    struct Store {
        records: BTreeMap<Vec<u8>, Vec<u8>>,
        revision: i64,
        max_answer: usize,
        /// Revisions below this one are compacted away.
        compacted_below: i64,
        /// Called before each read: changes the store between pages.
        before_read: fn(&mut Store),
        reads: Vec<(i64, i64, Values)>,
    }

    impl Store {
        fn new(records: impl IntoIterator<Item = (String, usize)>) -> Self {
            Self {
                records: records
                    .into_iter()
                    .map(|(name, size)| (format!("{PREFIX}{name}").into_bytes(), vec![b'x'; size]))
                    .collect(),
                revision: 7,
                max_answer: 10_000,
                compacted_below: 0,
                before_read: |_| {},
                reads: Vec::new(),
            }
        }
    }

    impl RangeReader for Store {
        async fn read(
            &mut self,
            from: &[u8],
            end: &[u8],
            limit: i64,
            revision: i64,
            values: Values,
        ) -> Result<Page, PageError> {
            (self.before_read)(self);
            self.reads.push((limit, revision, values));
            if revision != 0 && revision < self.compacted_below {
                return Err(PageError::Compacted);
            }
            let matching: Vec<_> = self.records.range(from.to_vec()..end.to_vec()).collect();
            let limit = usize::try_from(limit).expect("a positive limit");
            let entries: Vec<Entry> = matching
                .iter()
                .take(limit)
                .map(|(key, value)| Entry {
                    key: key.to_vec(),
                    value: (values == Values::Included).then(|| value.to_vec()),
                    etcd_lease: 0,
                    create_revision: 0,
                })
                .collect();
            let size: usize = entries
                .iter()
                .map(|entry| entry.key.len() + entry.value.as_ref().map_or(0, Vec::len))
                .sum();
            if size > self.max_answer {
                return Err(PageError::TooLarge);
            }
            Ok(Page {
                more: matching.len() > entries.len(),
                entries,
                revision: self.revision,
            })
        }
    }

    fn names(listing: &Listing) -> Vec<String> {
        listing
            .records
            .iter()
            .map(|record| record.key.trim_start_matches(PREFIX).to_string())
            .collect()
    }

    fn small_records(count: usize) -> Vec<(String, usize)> {
        (0..count)
            .map(|index| (format!("{index:05}"), 100))
            .collect()
    }

    #[tokio::test]
    async fn many_records_come_in_pages_all_at_the_first_pages_revision() {
        let mut store = Store::new(small_records(3000));
        store.max_answer = usize::MAX;
        store
            .records
            .insert(b"/docker-test/network/subnets".to_vec(), vec![]);
        store
            .records
            .insert(b"/docker-test/network/subnett".to_vec(), vec![]);
        let listing = list_in_pages(&mut store, PREFIX).await.expect("listed");
        assert_eq!(
            names(&listing),
            small_records(3000)
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        );
        assert_eq!(listing.revision, 7);
        assert_eq!(
            store.reads,
            [
                (PAGE_RECORDS, 0, Values::Included),
                (PAGE_RECORDS, 7, Values::Included),
                (PAGE_RECORDS, 7, Values::Included),
            ]
        );
    }

    #[tokio::test]
    async fn a_page_too_large_is_read_again_in_halves() {
        let mut store = Store::new([
            ("a".to_string(), 4000),
            ("b".to_string(), 4000),
            ("c".to_string(), 4000),
            ("d".to_string(), 10),
        ]);
        let listing = list_in_pages(&mut store, PREFIX).await.expect("listed");
        assert_eq!(names(&listing), ["a", "b", "c", "d"]);
        assert!(listing.records.iter().all(|record| record.value.is_some()));
        let reads: Vec<(i64, i64)> = store
            .reads
            .iter()
            .map(|(limit, revision, _)| (*limit, *revision))
            .collect();
        // Halved until two records fit (a, b), at the revision of that first answer; then
        // doubled again for the rest (c, d).
        assert_eq!(
            reads,
            [
                (1024, 0),
                (512, 0),
                (256, 0),
                (128, 0),
                (64, 0),
                (32, 0),
                (16, 0),
                (8, 0),
                (4, 0),
                (2, 0),
                (4, 7)
            ]
        );
    }

    #[tokio::test]
    async fn a_record_too_large_alone_is_listed_without_its_value() {
        let mut store = Store::new([
            ("a".to_string(), 10),
            ("huge".to_string(), 20_000),
            ("z".to_string(), 10),
        ]);
        let listing = list_in_pages(&mut store, PREFIX).await.expect("listed");
        assert_eq!(names(&listing), ["a", "huge", "z"]);
        let values: Vec<bool> = listing
            .records
            .iter()
            .map(|record| record.value.is_some())
            .collect();
        assert_eq!(values, [true, false, true]);
    }

    #[tokio::test]
    async fn a_value_above_a_records_limit_is_listed_without_it() {
        let mut store = Store::new([
            ("at-the-limit".to_string(), MAX_RECORD_VALUE),
            ("past-it".to_string(), MAX_RECORD_VALUE + 1),
        ]);
        store.max_answer = usize::MAX;
        let listing = list_in_pages(&mut store, PREFIX).await.expect("listed");
        let values: Vec<Option<usize>> = listing
            .records
            .iter()
            .map(|record| record.value.as_ref().map(Vec::len))
            .collect();
        assert_eq!(values, [Some(MAX_RECORD_VALUE), None]);
    }

    #[tokio::test]
    async fn a_listing_overtaken_by_a_compaction_starts_again() {
        let mut store = Store::new(small_records(1500));
        store.max_answer = usize::MAX;
        store.before_read = |store| {
            if store.reads.len() == 1 {
                store.revision = 9;
                store.compacted_below = 9;
            }
        };
        let listing = list_in_pages(&mut store, PREFIX).await.expect("listed");
        assert_eq!(listing.records.len(), 1500);
        assert_eq!(listing.revision, 9);
        let revisions: Vec<i64> = store
            .reads
            .iter()
            .map(|(_, revision, _)| *revision)
            .collect();
        assert_eq!(revisions, [0, 7, 0, 9]);
    }

    #[test]
    fn the_range_of_a_prefix_ends_where_etcd_ends_it() {
        assert_eq!(range_end(b"/a/subnets/"), b"/a/subnets0");
        assert_eq!(range_end(b"a\xff\xff"), b"b");
        assert_eq!(range_end(b"\xff"), b"\0");
        assert_eq!(key_after(b"/a/1"), b"/a/1\0");
    }

    #[test]
    fn the_page_limit_halves_to_one_and_grows_back() {
        let mut limit = PageLimit::default();
        let mut halvings = 0;
        while limit.shrink() {
            halvings += 1;
        }
        assert_eq!((limit.get(), halvings), (1, 10));
        for _ in 0..20 {
            limit.grow();
        }
        assert_eq!(limit.get(), PAGE_RECORDS);
    }
}
