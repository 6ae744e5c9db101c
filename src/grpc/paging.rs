//! Keyset paging for the List RPCs: a page token names the last row handed out
//! (`created_at_ms:id`, newest first), and the next page starts after it.

use uuid::Uuid;

use crate::error::ApiError;

const PAGE_DEFAULT: usize = 50;
const PAGE_MAX: usize = 500;

/// One page asked for: how many rows, and after which.
pub(super) struct Page {
    pub size: usize,
    pub after: Option<(i64, String)>,
}

impl Page {
    /// The page a request names; `page_size` 0 means the default, and more than the most is
    /// cut to it.
    pub fn of(page_size: u32, token: &str) -> Result<Self, ApiError> {
        let size = match page_size as usize {
            0 => PAGE_DEFAULT,
            n => n.min(PAGE_MAX),
        };
        Ok(Self {
            size,
            after: parse_token(token)?,
        })
    }

    /// How many rows to fetch: one more than the page, to know whether another follows.
    pub fn fetch(&self) -> usize {
        self.size + 1
    }

    /// Cuts `rows` (fetched with [`Page::fetch`]) to the page and returns the token of the
    /// next one, empty after the last.
    pub fn cut<T>(&self, rows: &mut Vec<T>, key: impl Fn(&T) -> (i64, Uuid)) -> String {
        if rows.len() <= self.size {
            return String::new();
        }
        rows.truncate(self.size);
        rows.last()
            .map(|row| {
                let (ms, id) = key(row);
                format!("{ms}:{id}")
            })
            .unwrap_or_default()
    }
}

fn parse_token(token: &str) -> Result<Option<(i64, String)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        ApiError::field(
            "page_token",
            "not a token from an earlier page of this list",
        )
    };
    let (ms, id) = token.split_once(':').ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some((ms.parse().map_err(|_| bad())?, id.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_what_a_page_hands_out_or_refused_by_field() {
        assert_eq!(parse_token("").unwrap(), None);
        let id = Uuid::new_v4();
        assert_eq!(
            parse_token(&format!("1733390000123:{id}")).unwrap(),
            Some((1_733_390_000_123, id.to_string()))
        );
        for bad in [
            "1733390000123",
            "x:00000000-0000-0000-0000-000000000000",
            &format!(":{id}"),
            "17:not-a-uuid",
            &format!("{id}:17"),
        ] {
            let e = parse_token(bad).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidArgument(m) if m.starts_with("page_token: ")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn a_page_is_cut_to_its_size_and_names_its_last_row() {
        let page = Page::of(2, "").unwrap();
        assert_eq!(page.fetch(), 3);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let mut rows: Vec<(i64, Uuid)> = (0..3).map(|i| (100 - i as i64, ids[i])).collect();
        let token = page.cut(&mut rows, |r| *r);
        assert_eq!(rows.len(), 2);
        assert_eq!(token, format!("99:{}", ids[1]));
        let next = Page::of(2, &token).unwrap();
        assert_eq!(next.after, Some((99, ids[1].to_string())));
        let mut last = vec![rows[0]];
        assert_eq!(next.cut(&mut last, |r| *r), "");
        assert_eq!(Page::of(0, "").unwrap().size, PAGE_DEFAULT);
        assert_eq!(Page::of(100_000, "").unwrap().size, PAGE_MAX);
    }
}
