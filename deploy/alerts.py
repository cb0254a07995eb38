"""Alerts on failed flow runs (deploy/deploy.sh runs this): the automations of deploy/automations.yaml,
pointed at the notification block named ``cityseg-alerts``.

    CITYSEG_ALERT_WEBHOOK_URL=https://hooks.slack.com/services/... python deploy/alerts.py

With CITYSEG_ALERT_WEBHOOK_URL set, the block is (re)saved as a Custom Webhook that POSTs
``{"text": "<subject>\\n<body>"}`` (what Slack, Mattermost and Teams incoming webhooks accept), the URL
kept in the block's secrets. Without it, an existing ``cityseg-alerts`` block of any notification type
(Slack, Teams, PagerDuty, ... made in the Prefect UI) is used; with neither, no automation is created.
Automations are created or updated in place by name, so re-deploying never duplicates them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.events.schemas.automations import AutomationCore

BLOCK_NAME = "cityseg-alerts"
URL_VARIABLE = "CITYSEG_ALERT_WEBHOOK_URL"
AUTOMATIONS = Path(__file__).resolve().parent / "automations.yaml"


def save_webhook_block(url: str) -> None:
    CustomWebhookNotificationBlock(
        name=BLOCK_NAME,
        # A placeholder filled from the secrets: webhook URLs carry tokens, kept out of the UI and API.
        url="{{webhook_url}}",
        json_data={"text": "{{subject}}\n{{body}}"},
        secrets={"webhook_url": url},
    ).save(BLOCK_NAME, overwrite=True)
    print(f"[alerts] notification block {BLOCK_NAME} (Custom Webhook) saved from ${URL_VARIABLE}")


def notification_block_id(client: SyncPrefectClient) -> UUID | None:
    """The id of the notification block named BLOCK_NAME, whatever its type; None if there is none."""
    found = [
        b
        for b in client.read_block_documents(include_secrets=False)
        if b.name == BLOCK_NAME and b.block_schema and "notify" in b.block_schema.capabilities
    ]
    if len(found) > 1:
        types = ", ".join(sorted(b.block_type_name or "?" for b in found))
        sys.exit(f"[alerts] several notification blocks are named {BLOCK_NAME} ({types}): delete all but one")
    return found[0].id if found else None


def load_automations(block_id: UUID, path: Path = AUTOMATIONS) -> list[AutomationCore]:
    automations: list[dict[str, Any]] = yaml.safe_load(path.read_text())["automations"]
    for automation in automations:
        for action in automation["actions"]:
            if action["type"] == "send-notification":
                action["block_document_id"] = str(block_id)
    return [AutomationCore.model_validate(a) for a in automations]


def apply(client: SyncPrefectClient, automation: AutomationCore) -> None:
    """Create the automation, or update the one of the same name (removing any duplicates)."""
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        client.create_automation(automation)
        print(f"[alerts] created automation {automation.name}")
        return
    keep, *duplicates = existing
    client.update_automation(keep.id, automation)
    for duplicate in duplicates:
        client.delete_automation(duplicate.id)
    print(f"[alerts] updated automation {automation.name}")


def main() -> None:
    if url := os.environ.get(URL_VARIABLE):
        save_webhook_block(url)
    with get_client(sync_client=True) as client:
        block_id = notification_block_id(client)
        if block_id is None:
            print(
                f"[alerts] no notification block named {BLOCK_NAME}: alerts on failed runs are OFF. "
                f"Set {URL_VARIABLE} (Slack or any webhook URL) or create the block in the Prefect UI, "
                "then re-run deploy/deploy.sh"
            )
            return
        for automation in load_automations(block_id):
            apply(client, automation)


if __name__ == "__main__":
    main()
