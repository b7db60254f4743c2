"""The node's services and what it publishes about its model: ``~/labels``, the
``class_labels`` parameter, ``~/vision_info``, ``~/learning_progress`` and ``/diagnostics``
(mixed into the node)."""
from __future__ import annotations

import dataclasses
import json
import time

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ..learning.config import MAX_LABEL_LENGTH
from ..learning.types import Progress
from .callbacks import answer, guarded_service, release_memory
from .diagnostics import LearnerFacts
from .parameters import CLASS_LABELS_PARAMETER
from .vision_msgs_bridge import method_name, vision_info_message

__all__ = ['OutputsMixin']


class OutputsMixin:
    """The node's services and its model, progress and diagnostics publishing."""

    @guarded_service('learn_task')
    def _on_learn_task(self, request: Trigger.Request, response: Trigger.Response
                       ) -> Trigger.Response:
        try:
            ok, reply = self._model.learn(self._values['min_samples_per_class'])
        finally:
            release_memory()  # the training peak (see ModelChanges)
        return answer(response, ok, reply)

    @guarded_service('cancel_learning')
    def _on_cancel_learning(self, request: Trigger.Request, response: Trigger.Response
                            ) -> Trigger.Response:
        return answer(response, *self._model.cancel())

    @guarded_service('undo_last_task')
    def _on_undo_last_task(self, request: Trigger.Request, response: Trigger.Response
                           ) -> Trigger.Response:
        return answer(response, *self._model.undo())

    @guarded_service('clear_buffer')
    def _on_clear_buffer(self, request: Trigger.Request, response: Trigger.Response
                         ) -> Trigger.Response:
        cleared = self.buffer.clear()
        self.get_logger().info(f'cleared {cleared} buffered samples')
        return answer(response, True, {'cleared': cleared})

    @guarded_service('save')
    def _on_save(self, request: Trigger.Request, response: Trigger.Response
                 ) -> Trigger.Response:
        try:
            return answer(response, *self._model.save())
        finally:
            release_memory()  # the serialised copy of the model

    @guarded_service('share_classes')
    def _on_share_classes(self, request: Trigger.Request, response: Trigger.Response
                          ) -> Trigger.Response:
        if not self._fleet.export:
            return answer(response, False, {'error': 'fleet_export is off'})
        published, size = self._fleet.share()
        return answer(response, True, {'published': published, 'bytes': size})

    def _publish_model(self) -> None:
        """Publish what describes the current model: ``~/labels``, the ``class_labels``
        parameter and ``~/vision_info`` (at start and after every change)."""
        classes = self.learner.classes
        origins = self.learner.fleet_ledger.origin_map()
        labels = {'model_version': self.learner.model_version, 'tasks': self.learner.tasks,
                  'classes': classes, 'origins': {c: origins.get(c, []) for c in classes}}
        self._labels_pub.publish(String(data=json.dumps(labels)))
        self._writing_labels.active = True
        try:
            result = self.set_parameters([Parameter(
                CLASS_LABELS_PARAMETER, Parameter.Type.STRING_ARRAY, labels['classes'])])[0]
        finally:
            self._writing_labels.active = False
        if not result.successful:
            self.get_logger().error(f'could not update {CLASS_LABELS_PARAMETER}: '
                                    f'{result.reason}')
        self._publish_vision_info()

    def _publish_vision_info(self) -> None:
        if self._vision_info_pub is None or not self._values['publish_vision_msgs']:
            return
        c = self.learner.config
        self._vision_info_pub.publish(vision_info_message(
            self.get_clock().now().to_msg(),
            method_name(c),
            f'{self.get_fully_qualified_name()}/{CLASS_LABELS_PARAMETER}',
            self.learner.model_version, self._vision))

    def _publish_progress(self, progress: Progress) -> None:
        try:
            self._progress_pub.publish(String(data=json.dumps(dataclasses.asdict(progress))))
        except Exception as exc:  # noqa: BLE001 - a lost progress message must not stop learning
            self.get_logger().warning(f'could not publish progress: {exc}',
                                      throttle_duration_sec=10.0)

    def _publish_diagnostics(self) -> None:
        try:
            now = time.monotonic()
            learner, model = self.learner, self._model
            facts = LearnerFacts(
                learning=model.learning, teaching=self._teaching(now) or '',
                last_task=model.last_task, last_change=model.last_change,
                last_error=model.last_error, progress=model.progress,
                max_label_length=MAX_LABEL_LENGTH,
                extra={'pending_parameters': sorted(model.pending_settings)})
            vision = ('published' if self._values['publish_vision_msgs'] else 'off') \
                if self._vision is not None else 'not installed'
            array = DiagnosticArray()
            array.header.stamp = self.get_clock().now().to_msg()
            array.status = [
                self._diag.inference(
                    self._stats, now, active=self._cameras is not None,
                    worker_alive=self._worker is not None and self._worker.alive,
                    camera_thread_alive=self._cameras is None or self._cameras.alive,
                    num_tasks=learner.num_tasks, topics=self._camera_topics,
                    static={'device': str(learner.device), 'backbone': learner.config.backbone,
                            'image_size': learner.config.image_size, 'vision_msgs': vision,
                            'runtime': learner.runtime[0], 'provider': learner.runtime[1],
                            'runtime_note': learner.runtime_note}),
                self._diag.learner(learner, self.buffer, self._stats, facts),
                self._diag.cbp(learner), self._diag.prompts(learner, self._stats),
                self._diag.fleet(self._fleet.status_values())]
            self._diagnostics_pub.publish(array)
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().error(f'diagnostics failed: {exc}', throttle_duration_sec=10.0)
