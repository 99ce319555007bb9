//! What a change answers, typed: the core returns these, and the edges (HTTP, sockets, a
//! forwarded call's reply) serialize them. A chat answer holds the stored chat, so it crosses
//! between nodes whole; [`ChatAnswer::wire`] is what clients see of it (no visitor token but
//! the one the creator gets).

use serde::{Deserialize, Serialize};

use crate::model::{Chat, ChatMessage, ChatView, Department, DeptReason, OperatorView};

/// The answer to a chat change (`POST /api/v1/chats`, `open_chat`, `send_message`, …).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum ChatAnswer {
    /// A chat was created; `visitor_token` goes to the creator only.
    Created { chat: Chat, visitor_token: String },
    /// The chat as the change left it (hand-over, close).
    Chat { chat: Chat },
    /// An operator opened the chat: it and its history.
    Opened {
        chat: Chat,
        messages: Vec<ChatMessage>,
    },
    /// A message was written.
    Sent { message: ChatMessage },
}

/// The wire form of a [`ChatAnswer`].
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum WireChatAnswer<'a> {
    Created {
        chat: ChatView<'a>,
        visitor_token: &'a str,
    },
    Chat(ChatView<'a>),
    Opened {
        chat: ChatView<'a>,
        messages: &'a [ChatMessage],
    },
    Sent {
        message: &'a ChatMessage,
    },
}

impl ChatAnswer {
    pub fn wire(&self) -> WireChatAnswer<'_> {
        match self {
            ChatAnswer::Created {
                chat,
                visitor_token,
            } => WireChatAnswer::Created {
                chat: chat.view(),
                visitor_token,
            },
            ChatAnswer::Chat { chat } => WireChatAnswer::Chat(chat.view()),
            ChatAnswer::Opened { chat, messages } => WireChatAnswer::Opened {
                chat: chat.view(),
                messages,
            },
            ChatAnswer::Sent { message } => WireChatAnswer::Sent { message },
        }
    }

    /// The chat the answer is about, when it names one whole.
    pub fn chat(&self) -> Option<&Chat> {
        match self {
            ChatAnswer::Created { chat, .. }
            | ChatAnswer::Chat { chat }
            | ChatAnswer::Opened { chat, .. } => Some(chat),
            ChatAnswer::Sent { .. } => None,
        }
    }
}

/// A department with its live state and counts (`GET`/`PUT /api/v1/departments/{id}`).
#[derive(Debug, Clone, Serialize)]
pub struct DepartmentView {
    #[serde(flatten)]
    pub department: Department,
    pub online: bool,
    pub reason: DeptReason,
    pub operators: usize,
    pub operators_online: usize,
    pub pending_chats: u32,
    pub queued_chats: usize,
    pub active_chats: u32,
    pub bot_chats: u32,
    /// Only while closed by its online hours: when it opens next (null: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<Option<String>>,
}

/// `PUT /api/v1/operators` with a list.
#[derive(Debug, Clone, Serialize)]
pub struct PutOperatorsAnswer {
    pub operators: Vec<OperatorView>,
    pub created: usize,
    pub updated: usize,
}
